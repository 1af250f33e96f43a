"""Mixed gradients (issue 19): DTensors on one or several meshes beside plain tensors, as users build them.

Each layout starts from the very modules the float64 reference runs (:mod:`tests.helpers.nd_models`'s
``NDNet`` and ``MoENet``), so the ranks and the reference share values, not code paths:

* :func:`lora_net`: LoRA adapters on an NDNet (frozen base weights, LoRA A/B, trainable norms and
  head). :func:`lora_on_fsdp2` shards the base model with ``fully_shard`` FIRST and attaches the
  adapters after, as PEFT does on a model that transformers sharded at load time: the adapters stay
  plain tensors beside the DTensor norms and head.
* :class:`PlainExpertMoE`: a MoENet whose experts are plain tensors, each rank its own (expert
  parallel by hand over an ``ep`` group), beside DTensor dense weights and a plain replicated router.
* :func:`multi_mesh_net`: an NDNet whose blocks live on different meshes (a 1-D mesh, a 2-D
  ``(dp, tp)`` mesh, its ``dp`` sub-mesh) and whose embedding stays a plain tensor.

The plain tensors' gradients are synchronised by hand (:func:`average_plain_grads`), as the HF
Trainer does for adapters FSDP2 does not manage (``Trainer._sync_replicated_trainable_parameters``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tests.helpers.nd_helpers import CopyToGroup, ReduceFromGroup
from tests.helpers.nd_models import EXPERTS, MoENet, cross_entropy, make_moe, make_net

RANK = 4  # LoRA rank


# ------------------------------------------------------------------------------------------- LoRA
class LoraLinear(nn.Module):
    """``base(x) + B(A(x))``: a frozen base Linear and a trainable low-rank update (PEFT's LoRA, scaling 1).

    B starts non-zero (PEFT's ``init_lora_weights=False``) so that A gets a gradient at once.
    """

    def __init__(self, base: nn.Linear, seed: int) -> None:
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(seed)
        dtype = base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, RANK, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(RANK, base.out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.randn(RANK, base.in_features, generator=g) / base.in_features ** 0.5)
            self.lora_B.weight.copy_(torch.randn(base.out_features, RANK, generator=g) / RANK ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def freeze_base(model: nn.Module) -> None:
    """Frozen: the embedding and every LoRA base weight; trainable: LoRA A/B, the LayerNorms, the head."""
    for name, p in model.named_parameters():
        p.requires_grad_(not (name.startswith("embed.") or ".base." in name))


def attach_lora(model: nn.Module) -> nn.Module:
    """Wrap each block's ``up`` and ``down`` in a :class:`LoraLinear` (seeded: the same adapters everywhere)."""
    for i, block in enumerate(model.blocks):
        block.up = LoraLinear(block.up, seed=10 * i + 1)
        block.down = LoraLinear(block.down, seed=10 * i + 2)
    freeze_base(model)
    return model


def lora_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The one-process model: NDNet with LoRA adapters (names ``blocks.N.{up,down}.{base,lora_A,lora_B}.*``)."""
    return attach_lora(make_net(dtype))


def lora_on_fsdp2(mesh: Any) -> nn.Module:
    """:func:`lora_net` sharded the PEFT-on-a-sharded-model way: ``fully_shard`` each block and the root
    over ``mesh`` first, then the adapters attached (plain tensors FSDP2 does not manage)."""
    model = make_net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return attach_lora(model)


# ---------------------------------------------------------------------------------------- experts
class PlainExpertMoE(nn.Module):
    """MoENet with this rank's experts as a plain ``[E/ep, D, D]`` tensor (expert parallel by hand).

    Every rank of an ep group sees the same tokens and runs its own experts; Megatron's f/g make
    the dense gradients identical across ep. The router stays a plain tensor too (replicated).
    """

    def __init__(self, ep_group: Any) -> None:
        super().__init__()
        reference = make_moe()
        ep = dist.get_world_size(ep_group)
        per = EXPERTS // ep
        self.first = dist.get_rank(ep_group) * per
        self.embed, self.router, self.head = reference.embed, reference.router, reference.head
        self.experts = nn.Parameter(reference.experts.detach()[self.first:self.first + per].clone())
        self.group = ep_group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, gate = MoENet.gate_and_input(self, tokens)
        mine = MoENet.mix(CopyToGroup.apply(x, self.group), CopyToGroup.apply(gate, self.group), self.experts,
                          self.first)
        return self.head(x + ReduceFromGroup.apply(mine, self.group))


def plain_experts_moe(world_mesh: Any, ep_group: Any) -> PlainExpertMoE:
    """Dense embed/head ``fully_shard`` over the 1-D ``world_mesh``; experts and router left plain."""
    model = PlainExpertMoE(ep_group)
    fully_shard(model, mesh=world_mesh, ignored_params={model.experts, model.router.weight, model.router.bias})
    return model


# ------------------------------------------------------------------------------------ many meshes
def multi_mesh_net(world_mesh: Any, tp_mesh: Any) -> nn.Module:
    """NDNet on three meshes and a plain tensor: block 0 ``fully_shard`` over the 1-D ``world_mesh``;
    block 1 tensor parallel on ``tp_mesh["tp"]`` then ``fully_shard`` over ``tp_mesh["dp"]`` (DTensors on
    the 2-D ``(dp, tp)`` mesh); the final norm and head on the ``dp`` sub-mesh (copies across tp); the
    embedding a plain tensor (replicated, FSDP2 ignores it)."""
    model = make_net()
    fully_shard(model.blocks[0], mesh=world_mesh)
    parallelize_module(model.blocks[1], tp_mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model.blocks[1], mesh=tp_mesh["dp"])
    fully_shard(model, mesh=tp_mesh["dp"], ignored_params={model.embed.weight})
    return model


# ------------------------------------------------------------------------------------------ common
def average_plain_grads(model: nn.Module, group: Any = None, skip: tuple[torch.Tensor, ...] = ()) -> None:
    """Average the gradients of the plain (non-DTensor) trainable parameters over ``group``: what the user,
    or the HF Trainer's post-accumulate hook, does for parameters FSDP2 does not manage."""
    for p in model.parameters():
        if p.grad is not None and not isinstance(p.grad, DTensor) and all(p is not s for s in skip):
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=group)


def trainable_reference_grads(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 gradients of the mean loss over the whole batch, trainable parameters only, in one process."""
    model.zero_grad()
    cross_entropy(model(tokens), targets).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def per_mesh_norm(params: list[torch.Tensor], p: float) -> torch.Tensor:
    """The field's workaround for mixed gradients, written out: accelerate 1.16's
    ``Accelerator._clip_grad_norm_dtensor_aware`` and transformers 5.24's ``Trainer._mixed_mesh_grad_norm``
    group the gradients by mesh (plain tensors as one more "mesh"), take torch's ``get_total_norm`` of each
    group (a DTensor norm, made whole with ``full_tensor()``: a collective per group), and combine them.
    A plain tensor counts as this rank's own."""
    from collections import defaultdict

    from torch.nn.utils import get_total_norm

    by_mesh: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        if param.grad is not None:
            by_mesh[param.grad.device_mesh if isinstance(param.grad, DTensor) else None].append(param.grad)
    norms = [get_total_norm(grads, p) for grads in by_mesh.values()]
    return torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]), p)
