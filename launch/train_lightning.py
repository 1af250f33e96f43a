"""distclip with PyTorch Lightning: exact per-group clipping as one callback.

    python launch/train_lightning.py --accelerator cpu --devices 2 --steps 3     # Lightning starts the 2nd process

The model, data and loss are those of ``launch/train_accelerate.py`` (held as ``self.model``, so the
parameter names are ``model.embed.weight``, ``model.blocks.N.attn.*``, ...: group patterns match the
LightningModule's names). The distclip config: ``--config FILE.yaml``, else ``$DISTCLIP_CONFIG``,
else the demo config below. Rank 0 prints, per step, the exact global gradient norm and each
group's norm and coefficient, as logged by the callback (``--json``: one JSON object per rank
and step, which the tests compare with a float64 replay).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_accelerate import batch, loss_fn, make_model  # noqa: E402  (same model and data)

DEMO_CONFIG = {"max_norm": 1.0, "groups": [{"name": "embeddings", "match": ["*embed*"], "max_norm": 0.5},
                                           {"name": "attention", "match": ["*blocks.*.attn.*"], "max_norm": 1.0}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", default="ddp", help="ddp; on GPUs also fsdp, deepspeed_stage_2, ...")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--loss-scale", type=float, default=3.0, help="scales the loss (and gradients): makes clipping bite")
    parser.add_argument("--config", default=None, help="distclip YAML (default: $DISTCLIP_CONFIG, else a demo config)")
    parser.add_argument("--json", action="store_true", help="one JSON object per rank and step")
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import torch.distributed as dist

    from distclip.lightning import DistclipCallback

    class TinyLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model()

        def training_step(self, data: Any, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.model, *data, args.loss_scale)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.trainer.model.parameters(), lr=args.lr)

        def train_dataloader(self) -> torch.utils.data.DataLoader:  # rank r's batch i, as in train_accelerate.py
            data = [batch(step, self.global_rank, args.batch) for step in range(args.steps)]
            return torch.utils.data.DataLoader(data, batch_size=None)

    class PrintClips(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, data: Any, batch_idx: int) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # what DistclipCallback logged
            groups = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("grad_norm/")}
            coefs = {name: metrics[f"clip_coef/{name}"] for name in groups}
            world = dist.get_world_size() if dist.is_initialized() else 1
            if args.json:
                record = {"rank": trainer.global_rank, "step": batch_idx, "world_size": world,
                          "strategy": type(trainer.strategy).__name__, "grad_norm": metrics["grad_norm"],
                          "group_norms": groups, "coefs": coefs}
                sys.stdout.write(f"DISTCLIP {json.dumps(record)}\n")  # one write: ranks share the stream
                sys.stdout.flush()
            elif trainer.is_global_zero:
                shown = "  ".join(f"{name} {value:.4g} x{coefs[name]:.3f}" for name, value in groups.items())
                print(f"step {batch_idx} | world {world} | grad_norm {metrics['grad_norm']:.6g} | {shown}", flush=True)

    config = args.config or (None if os.environ.get("DISTCLIP_CONFIG") else DEMO_CONFIG)
    torch.set_num_threads(1)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, max_steps=args.steps,
                         callbacks=[DistclipCallback(config), PrintClips()], logger=False, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.fit(TinyLM())
    return 0


if __name__ == "__main__":
    sys.exit(main())
