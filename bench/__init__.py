"""Benchmarks side by side with transformers: time to first token, decode speed and peak memory per runtime.
Run `python -m bench --help`."""
