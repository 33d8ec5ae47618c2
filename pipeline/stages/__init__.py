"""The run's stages, one module each: the load before the rounds; the round's train, noise, check (the stop check)
and probe; the export after the rounds.

Each module holds both sides of its stage: the work a worker does (``...Work``, a part of ``RoundWorker``, which Ray
calls as the actor's methods) and the coordinator's side (``...Stage``, a part of ``coordinator.Run``): its unit of
done, its commit through ``pipeline.storage.markers`` (data written and verified, marker last), and how it is spread
over the workers through the executor (``pipeline.executor``).
"""
