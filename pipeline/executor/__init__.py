"""Executors: what runs the workers. ``ray_pool`` starts them as Ray actors on a cluster (a local one by default);
``local`` holds one in this process (for bench and the benchmark scripts). Both offer the same calls, which the
coordinator and the stages use: ``start_workers``, ``put``, ``get``, ``get_all``, ``wait``, ``next_of``, ``kill``."""
