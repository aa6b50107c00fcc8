"""Benchmarks of ldreg_kernels against its peers: ``python -m benchmarks.run`` (see run.py)."""
