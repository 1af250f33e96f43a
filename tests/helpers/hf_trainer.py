"""The HF Trainer as the integration tests run it: distclip enabled by one line, SGD at a constant rate, gloo on
CPU, a log per step, and every batch each rank trained on recorded (for the float64 replay)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def train_recorded(model: nn.Module, dataset: list[dict[str, torch.Tensor]], config: dict[str, Any],
                   output_dir: str, *, batch_size: int, steps: int, max_grad_norm: float,
                   lr: float) -> tuple[Any, list[Any]]:
    """Train ``model`` for ``steps`` with ``distclip.hf_trainer.enable(trainer, config)``; returns the trainer
    and, gathered from every rank, the first ``steps`` batches each one trained on."""
    from transformers import Trainer, TrainingArguments

    import distclip.hf_trainer

    seen: list[dict[str, torch.Tensor]] = []

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        stacked = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        seen.append({k: v.clone() for k, v in stacked.items()})
        return stacked

    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=batch_size,
        max_steps=steps, max_grad_norm=max_grad_norm, optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    distclip.hf_trainer.enable(trainer, config)  # <- the one line
    trainer.train()
    batches: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(batches, seen[:steps])  # the dataloader fetches one batch ahead
    return trainer, batches
