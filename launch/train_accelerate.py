"""distclip with Accelerate: a tiny transformer-shaped model, exact per-group clipping, one line to enable it.

    distclip launch --config_file configs/accelerate_multi_cpu.yaml launch/train_accelerate.py --steps 3

Works under every Accelerate mode distclip supports (DDP on CPU or GPU, FSDP, DeepSpeed); the
distclip config comes from ``$DISTCLIP_CONFIG``, which ``distclip launch`` fills from the YAML's
``distclip:`` section (plain ``accelerate launch`` users set it themselves). Every rank prints,
per step, the world size it runs in and the exact global gradient norm with its group norms
(``--json``: one JSON object per line, which the tests compare with a float64 reference).
Parameter names: ``embed.weight``, ``blocks.N.{norm,attn,mlp.0,mlp.2}.*``, ``head.*``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
from torch import nn

VOCAB, SEQ, DIM = 40, 6, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.Tanh(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn(self.norm(x)))
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(dtype: torch.dtype = torch.float32) -> TinyTransformer:
    torch.manual_seed(0)  # the same initial weights on every rank (and in the tests' reference)
    return TinyTransformer().to(dtype)


def batch(step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: different on every rank and step, reproducible anywhere."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (size, SEQ), generator=g), torch.randint(0, VOCAB, (size, SEQ), generator=g)


def loss_fn(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))


def build_accelerator(batch_size: int):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU (tests)
    accelerator = Accelerator(kwargs_handlers=handlers)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # no prepared DataLoader to infer these from
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        plugin.deepspeed_config["zero_allow_untested_optimizer"] = True  # plain SGD
    return accelerator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--loss-scale", type=float, default=3.0, help="scales the loss (and gradients): makes clipping bite")
    parser.add_argument("--max-norm", type=float, default=None, help="default: the distclip config's max_norm")
    parser.add_argument("--json", action="store_true", help="one JSON object per rank and step")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    import distclip.accelerate

    accelerator = build_accelerator(args.batch)
    clipping = distclip.accelerate.enable(accelerator)  # <- the one line (config from $DISTCLIP_CONFIG)
    max_norm = args.max_norm if args.max_norm is not None else clipping.config.max_norm
    torch.set_num_threads(1)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    world = dist.get_world_size() if dist.is_initialized() else 1
    mode = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if accelerator.is_main_process and not args.json:
        print(f"distclip + Accelerate: {accelerator.num_processes} processes ({mode}, torch world size {world}), "
              f"config {clipping.config.to_dict()}", flush=True)
    for step in range(args.steps):
        tokens, targets = (t.to(accelerator.device) for t in batch(step, rank, args.batch))
        accelerator.backward(loss_fn(model, tokens, targets, args.loss_scale))  # DeepSpeed clips and steps in here
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad()
        report = clipping.last_report
        record = {"rank": rank, "step": step, "num_processes": accelerator.num_processes, "world_size": world,
                  "distributed_type": mode, "norm": norm.item(), "dtype": str(norm.dtype), **report.to_floats()}
        if args.json:
            sys.stdout.write(f"DISTCLIP {json.dumps(record)}\n")  # one write: ranks share the stream
            sys.stdout.flush()
        elif accelerator.is_main_process:
            groups = "  ".join(f"{name} {value:.4g} x{record['coefs'][name]:.3f}"
                               for name, value in record["group_norms"].items())
            print(f"step {step} | norm {record['norm']:.6g} | {groups}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # Release the wrappers before the process group (else gloo can abort at exit: rc 134, "terminate
    # called without an active exception", when DDP / DeepSpeed still hold it).
    del model, optimizer
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
