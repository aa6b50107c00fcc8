"""The kNN backends. Each module defines its ops through ``ldreg_kernels._op`` and lists
what it offers in ``BACKENDS``; ``ldreg_kernels.registry`` imports them and records which
loaded (and why not). Optional ones (``native``, ``triton``) raise ImportError when they
cannot load."""
