"""Benchmarks: python -m distclip.bench (see __main__)."""
