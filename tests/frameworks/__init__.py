"""Tests inside the real training frameworks (torchtitan, OLMo-core, torchft) on CPU gloo."""
