"""Benchmarks against peers: the op benchmarks (run as scripts, ``python bench/dsconv.py``) and the suite that
runs them all with the end-to-end comparison (``python -m bench``, see bench/run.py)."""
