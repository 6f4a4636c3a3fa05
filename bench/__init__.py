"""Benchmarks: `python -m bench.<name>` or `lockstep bench`."""
