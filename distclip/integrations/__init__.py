"""Framework integrations (DeepSpeed, Accelerate, the HF Trainer, Lightning), each importing its framework lazily.

Import them by their short paths, which stay stable: ``distclip.deepspeed``, ``distclip.accelerate``,
``distclip.hf_trainer``, ``distclip.lightning``.
"""
