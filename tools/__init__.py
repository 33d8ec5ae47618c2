"""What is not the run itself: ``unlearnable bench``, ``demo``, ``report`` and ``make-shards``, and the MNIST loader
that the demo, the benchmarks and the tests build their corpora with. The run (``pipeline``) never imports these."""
