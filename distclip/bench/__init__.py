"""Benchmarks: python -m distclip.bench (see __main__); python -m distclip.bench.scale (the set-up and per-clip
payload at thousands of simulated ranks, see scale)."""
