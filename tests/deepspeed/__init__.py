"""DeepSpeed ZeRO 0-3 (and MoE) on gloo ranks vs float64."""
