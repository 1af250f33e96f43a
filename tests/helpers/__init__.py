"""Shared test helpers: the float64 reference, checks, models, launch and DeepSpeed helpers (no tests here)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root (launch/, configs/, distclip/)
