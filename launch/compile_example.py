"""torch.compile and distclip on CPU (gloo): per-block compiled models, a compiled optimizer step, graph breaks.

    torchrun --nproc_per_node 2 launch/compile_example.py --layout fsdp2   # fully_shard, per-block compile
    torchrun --nproc_per_node 2 launch/compile_example.py --layout ddp     # DDP + AdamW(fused=True): the fold

Two copies of one model train side by side on the same data: one eager, one with each block compiled
the way torchtitan's ``apply_compile`` does it (``block.compile(fullgraph=True)`` before data
parallelism) and a compiled optimizer step (``torch.compile(opt.step)``). distclip is attached to both
optimizers (``comm_hook: true``: the norm is computed inside DDP's comm hook / FSDP2's all-reduce hook).
On rank 0, per step: both norms, where each came from, and the float64 norm of the compiled model's
gradients (gathered whole); with fused AdamW, the ``grad_scale`` the coefficient was folded into.
Then the graph breaks dynamo makes of the compiled step, and of a region that calls ``clip()``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip

VOCAB, DIM, SEQ, BATCH, STEPS = 32, 16, 8, 4, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(layout: str, compiled: bool) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    if compiled:  # torchtitan's apply_compile: each block, fullgraph, before data parallelism
        for block in model.layers:
            block.compile(fullgraph=True)
    if layout == "ddp":
        target: nn.Module = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        target = model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    return model, target, opt


def norm64(model: nn.Module) -> float:
    """The float64 2-norm of the model's gradients, gathered whole (what an exact clip must find)."""
    grads = [(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double() for p in model.parameters()]
    return torch.cat([g.flatten() for g in grads]).norm().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=["ddp", "fsdp2"], default="fsdp2")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch._logging").setLevel(logging.ERROR)
    say = print if rank == 0 else (lambda *a, **k: None)
    runs: dict[str, Any] = {}
    for kind in ("eager", "compiled"):
        model, target, opt = build(args.layout, kind == "compiled")
        clipper = distclip.GradClipper(target, {"max_norm": 0.5, "comm_hook": True})
        clipper.attach(opt)  # folds into grad_scale for fused AdamW under DDP, scales the gradients otherwise
        folded: list[float] = []

        @torch.compiler.disable
        def spy(optimizer: torch.optim.Optimizer, *_: Any, folded: list[float] = folded) -> None:
            # what the fused kernel will read
            scale = getattr(optimizer, "grad_scale", None)
            folded.append(math.nan if scale is None else float(scale))

        opt.register_step_pre_hook(spy)
        step = torch.compile(opt.step) if kind == "compiled" else opt.step
        runs[kind] = rows = []
        start = time.perf_counter()
        for s in range(STEPS):
            g = torch.Generator().manual_seed(1000 * s + rank)
            tokens, targets = torch.randint(0, VOCAB, (2, BATCH, SEQ), generator=g)
            loss = nn.functional.cross_entropy(target(tokens).reshape(-1, VOCAB), targets.reshape(-1))
            loss.backward()
            exact = norm64(model)
            step()
            report = clipper.last_report
            rows.append((report.total_norm.item(), report.source, exact, report.coefs["default"].item(), folded[-1]))
            opt.zero_grad()
        runs[kind + "_seconds"] = time.perf_counter() - start
        runs[kind + "_params"] = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
        runs[kind + "_opt"] = (model, target, opt, clipper)

    say(f"{args.layout}, {dist.get_world_size()} ranks, blocks compiled with block.compile(fullgraph=True), "
        f"compiled step torch.compile(opt.step), {type(runs['compiled_opt'][2]).__name__}"
        f"({'fused' if args.layout == 'ddp' else 'foreach'}), clipper.attach(opt), comm_hook: true")
    say(f"{'step':>4} {'eager norm':>12} {'compiled norm':>14} {'rel diff':>9} {'float64 (compiled)':>19} "
        f"{'rel err':>8} {'source':>10} {'coef':>8} {'grad_scale':>10}")
    for s, (e, c) in enumerate(zip(runs["eager"], runs["compiled"])):
        say(f"{s:>4} {e[0]:>12.9f} {c[0]:>14.9f} {abs(c[0] - e[0]) / e[0]:>9.1e} {c[2]:>19.12f} "
            f"{abs(c[0] - c[2]) / c[2]:>8.1e} {c[1]:>10} {c[3]:>8.5f} {c[4]:>10.5g}")
    diff = max((a - b).abs().max().item() for a, b in zip(runs["eager_params"], runs["compiled_params"]))
    say(f"first {STEPS} steps: eager {runs['eager_seconds']:.1f} s, compiled {runs['compiled_seconds']:.1f} s "
        f"(compilation included); parameters after {STEPS} steps, compiled vs eager: max |diff| {diff:.1e}")

    model, target, opt, clipper = runs["compiled_opt"]
    g = torch.Generator().manual_seed(7 + rank)
    tokens, targets = torch.randint(0, VOCAB, (2, BATCH, SEQ), generator=g)
    nn.functional.cross_entropy(target(tokens).reshape(-1, VOCAB), targets.reshape(-1)).backward()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(opt.step)()
    graphs = (f"{explained.graph_count} graph(s), {explained.graph_break_count} graph break(s)" if explained.graph_count
              else "no graph (torch does not trace fused optimizers: its _fused_adam is torch.compiler.disable'd)")
    say(f"explain(opt.step) with attach: {graphs}; the clip ran: {clipper.steps == STEPS + 1}")
    probe = torch.ones(3)

    def region() -> torch.Tensor:
        y = probe * 2
        clipper.clip()
        return y + 1

    explained = torch._dynamo.explain(region)()
    say(f"explain(y = x * 2; clipper.clip(); y + 1): {explained.graph_count} graphs, "
        f"{explained.graph_break_count} graph break: {str(explained.break_reasons[0].reason).splitlines()[0]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
