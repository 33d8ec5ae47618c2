"""The storage side of a run: URLs and atomic writes, shard reading and writing, markers, manifests, the layout.

The commit protocol lives here: outputs are written to scratch, uploaded to their final key (the atomic step),
verified, and only then is the marker written.
"""
