"""Each gradient layout (DDP, FSDP1, FSDP2, subsets, GradScaler, AGC, resume) on gloo ranks vs float64."""
