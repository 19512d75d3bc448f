"""The Spark floor: the distributed engine and everything it runs on.

``engine`` (the runner ``fit`` uses for RDDs and DataFrames), ``allreduce`` (the sharded and
replicated strategies), ``stages`` (the task functions), ``protocol`` (record kinds and the
settings tasks receive), ``worker`` (what a Python worker keeps between tasks),
``shards``/``arrow_shards`` (data),
``wire`` and ``rawrdd`` (records as raw bytes), ``localcache`` (the host-local record cache),
``device`` (GPU placement), ``checkpoint``, ``faults``, ``errors``, ``tensor``, ``readers``,
``session``. It builds on the training floor, which never imports it.
"""
