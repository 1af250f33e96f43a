"""Accelerate, Lightning and the HF Trainer driving distclip."""
