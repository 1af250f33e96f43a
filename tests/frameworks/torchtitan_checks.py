"""What one 4-rank launch checks inside the ranks, for one torchtitan layout (used by test_torchtitan.py
and launch/torchtitan_example.py).

Per layout: torchtitan's own model, parallelize / pipelining function, loss and backward (its
``forward_backward_step``) make the gradients; every gradient is gathered as a full float64 tensor
(``full_tensor()``, and across pipeline stages) and the reference norms are computed from those in
float64 by :mod:`tests.helpers.reference` (no distclip code). Then, on the same gradients:

* distclip through :class:`DistclipTrainer`'s clip (the function ``train_step`` calls in place of
  torchtitan's), for every config of :func:`configs`: norms, collectives of the clip alone (the
  clipper is built first), the clipped local gradients against ``held x reference coefficient``,
  bitwise identity across ranks (all_gather);
* the plain :func:`distclip.integrations.torchtitan.clip_grad_norm_` (torchtitan's signature);
* torchtitan's own ``clip_grad_norm_`` (p = 2, inf, 1.5): its error against the same reference and
  its collectives.

Then one real ``train_step`` of :class:`DistclipTrainer` (torchtitan's code; its clip call routed):
the pre-clip gradients captured when the clip is called, the gradients after the step, what
torchtitan's metrics logger got, and whether torchtitan's clip (``get_total_norm`` /
``clip_grads_with_norm_``) ran at all.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
import torchtitan.distributed.utils as tt_dist_utils
from torch.distributed.tensor import DTensor

from distclip.integrations import torchtitan as integration
from tests.frameworks import torchtitan_harness as harness
from tests.helpers.checks import assert_same_on_all_ranks
from tests.helpers.nd_helpers import count_collectives
from tests.helpers.reference import assign, norm64, rel_err

P_VALUES = (2.0, math.inf, 1.5)
SMALL = 1e-3  # below every group norm of these models: clipped
LARGE = 1e3  # above every norm: not clipped


def groups(model: str) -> list[dict[str, Any]]:
    """Clip groups by torchtitan's parameter names: embeddings, attention, and the experts (MoE) or MLPs."""
    third = ({"name": "experts", "match": "*.moe.routed_experts.*", "max_norm": SMALL} if model == "deepseek_v3"
             else {"name": "mlp", "match": "*.feed_forward.*", "max_norm": SMALL})
    return [{"name": "embeddings", "match": "tok_embeddings.*", "max_norm": LARGE},
            {"name": "attention", "match": "*.attention.*", "max_norm": SMALL}, third]


def configs(model: str) -> list[dict[str, Any]]:
    """Per p: uniform and per group; then one layout mixing norm types (inf, 1.5 and 2 groups)."""
    out: list[dict[str, Any]] = []
    for p in P_VALUES:
        out.append({"max_norm": SMALL, "norm_type": p})
        out.append({"max_norm": SMALL, "norm_type": p, "groups": groups(model)})
    mixed = [{**g, "norm_type": q} for g, q in zip(groups(model), (math.inf, 1.5, 2.0))]
    out.append({"max_norm": SMALL, "norm_type": 2.0, "groups": mixed})
    return out


def reference(full: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """float64 norms of the gathered gradients and the coefficient of each group (torch's rule)."""
    p = float(config["norm_type"])
    specs = {g["name"]: g for g in config.get("groups", [])}
    members: dict[str, list[str]] = {name: [] for name in specs} | {"default": []}
    for name in full:
        members[assign(name, config.get("groups", []))].append(name)
    norms, coefs = {}, {}
    for group, names in members.items():
        spec = specs.get(group, {})
        norms[group] = norm64([full[n] for n in names], float(spec.get("norm_type", p)))
        coefs[group] = min(1.0, float(spec.get("max_norm", config["max_norm"])) / (norms[group] + 1e-6))
    group_of = {name: group for group, names in members.items() for name in names}
    return {"total": norm64(list(full.values()), p), "groups": norms, "coefs": coefs, "group_of": group_of}


def shared_reference(full: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """:func:`reference` computed on rank 0 and broadcast (every rank holds the same gathered gradients):
    the ranks share two CPU cores in CI."""
    box = [reference(full, config) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def held_locals(trainer: Any) -> dict[str, torch.Tensor]:
    return {n: local(p.grad).detach().clone() for n, p in harness.named_params(trainer) if p.grad is not None}


def restore(trainer: Any, held: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in harness.named_params(trainer):
            if p.grad is not None:
                local(p.grad).copy_(held[n])


def grad_error(trainer: Any, held: dict[str, torch.Tensor], ref: dict[str, Any]) -> float:
    """Largest error of this rank's clipped gradient pieces against ``held x reference coefficient``,
    relative to each tensor's largest element (every local copy checked, replicas included)."""
    worst = 0.0
    for name, p in harness.named_params(trainer):
        if p.grad is None or held[name].numel() == 0:
            continue
        expected = held[name].double() * ref["coefs"][ref["group_of"][name]]
        scale = expected.abs().max().item()
        diff = (local(p.grad).double() - expected).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def synthetic_grads(trainer: Any) -> None:
    """Gradients in torchtitan's own parameter layout without a backward (for a layout whose attention has
    no CPU backward): an elementwise function of each parameter, so replicas hold equal copies."""
    with torch.no_grad():
        for i, (_, p) in enumerate(harness.named_params(trainer)):
            p.grad = torch.sin(p.detach() * 37.0 + 0.1 * i) * (1.0 + 0.05 * i)


def use_section(trainer: Any, config: dict[str, Any]) -> None:
    """Give the trainer a distclip section with these settings and rebuild its clipper (a set-up collective)."""
    trainer.config.distclip = integration.DistclipSection(settings=dict(config))
    trainer.grad_clipper = trainer.build_grad_clipper()


def clip_record(trainer: Any, config: dict[str, Any], full: dict[str, torch.Tensor],
                held: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One distclip clip through the trainer's routed clip function, checked against the reference."""
    use_section(trainer, config)
    params = [q for part in trainer.model_parts for q in part.parameters()]
    pd = trainer.parallel_dims
    norm, collectives = count_collectives(lambda: trainer.distclip_clip_grad_norm_(
        params, trainer.config.training.max_norm, foreach=True, pp_mesh=pd.get_optional_mesh("pp"),
        ep_enabled=pd.ep_enabled))
    report = trainer.last_clip_report
    assert norm is report.total_norm
    assert_same_on_all_ranks(report.total_norm, *report.group_norms.values(), *report.coefs.values())
    ref = shared_reference(full, config)
    record = {
        "config": config, "collectives": collectives, "total": report.total_norm.item(), "ref_total": ref["total"],
        "total_err": rel_err(report.total_norm.item(), ref["total"]),
        "group_err": {g: rel_err(report.group_norms[g].item(), v) for g, v in ref["groups"].items()
                      if g in report.group_norms},
        "groups": sorted(report.group_norms), "ref_groups": sorted(ref["groups"]),
        "coefs": {g: c.item() for g, c in report.coefs.items()},
        "grad_err": grad_error(trainer, held, ref),
    }
    restore(trainer, held)
    return record


def torchtitan_clip(trainer: Any, p: float, full: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> dict[str, Any]:
    """torchtitan's own clip_grad_norm_ as its train_step calls it: error vs float64 and collectives."""
    pd = trainer.parallel_dims
    params = [q for part in trainer.model_parts for q in part.parameters()]
    norm, collectives = count_collectives(lambda: tt_dist_utils.clip_grad_norm_(
        params, SMALL, p, foreach=True, pp_mesh=pd.get_optional_mesh("pp"), ep_enabled=pd.ep_enabled))
    restore(trainer, held)
    ref = shared_reference(full, {"max_norm": SMALL, "norm_type": p})
    return {"p": p, "collectives": collectives, "total": float(norm), "ref_total": ref["total"],
            "err": rel_err(float(norm), ref["total"])}


def plain_function(trainer: Any, full: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The plain clip_grad_norm_ (torchtitan's signature), on model_parts with groups and on the parameters
    as torchtitan's train_step passes them; each counted on its second call (the first builds and caches
    its clipper)."""
    pd = trainer.parallel_dims
    config = {"max_norm": SMALL, "norm_type": 2.0, "groups": groups(trainer.layout_model)}

    def call() -> torch.Tensor:
        return integration.clip_grad_norm_(trainer.model_parts, SMALL, 2.0, foreach=True,
                                           pp_mesh=pd.get_optional_mesh("pp"), ep_enabled=pd.ep_enabled,
                                           groups=config["groups"])

    call()
    restore(trainer, held)
    norm, collectives = count_collectives(call)
    ref = shared_reference(full, config)
    out = {"collectives": collectives, "total_err": rel_err(norm.item(), ref["total"]),
           "grad_err": grad_error(trainer, held, ref)}
    restore(trainer, held)

    def as_torchtitan_calls() -> torch.Tensor:  # its train_step's exact call: the parameters, uniform
        params = [q for part in trainer.model_parts for q in part.parameters()]
        return integration.clip_grad_norm_(params, SMALL, foreach=True, pp_mesh=pd.get_optional_mesh("pp"),
                                           ep_enabled=pd.ep_enabled)

    as_torchtitan_calls()
    restore(trainer, held)
    norm, collectives = count_collectives(as_torchtitan_calls)
    ref = shared_reference(full, {"max_norm": SMALL, "norm_type": 2.0})
    out["parameters"] = {"collectives": collectives, "total_err": rel_err(norm.item(), ref["total"]),
                         "grad_err": grad_error(trainer, held, ref)}
    restore(trainer, held)
    return out


def train_step_record(trainer: Any, config: dict[str, Any], step: int) -> dict[str, Any]:
    """One ``DistclipTrainer.train_step`` (torchtitan's code) with its clip call spied on."""
    use_section(trainer, config)
    seen: dict[str, Any] = {}
    routed = trainer.distclip_clip_grad_norm_

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen["full"] = harness.full_grads64(trainer)  # the pre-clip gradients torchtitan made (collectives, before)
        seen["held"] = held_locals(trainer)
        seen["kwargs"] = {k: (v is not None) if k == "pp_mesh" else v for k, v in kwargs.items()}
        seen["calls"] = seen.get("calls", 0) + 1
        out, seen["collectives"] = count_collectives(lambda: routed(*args, **kwargs))
        return out

    torch_calls = {"get_total_norm": 0, "clip_grads_with_norm_": 0}
    originals = {name: getattr(torch.nn.utils, name) for name in torch_calls}

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            torch_calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    trainer.distclip_clip_grad_norm_ = spy
    for name in torch_calls:
        setattr(torch.nn.utils, name, counting(name))
    try:
        trainer.step = step
        trainer.metrics_logger.records.clear()
        trainer.metrics_processor.data_loading_times = [0.0]
        trainer.train_step(harness.data_iterator(trainer, step))
    finally:
        for name, fn in originals.items():
            setattr(torch.nn.utils, name, fn)
        del trainer.distclip_clip_grad_norm_
    ref = shared_reference(seen["full"], config)
    report = trainer.last_clip_report
    assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
    logged = {k: v for _, metrics in trainer.metrics_logger.records for k, v in metrics.items()}
    return {
        "calls": seen["calls"], "kwargs": seen["kwargs"], "collectives": seen["collectives"],
        "torchtitan_clip_calls": dict(torch_calls),
        "total": report.total_norm.item(), "total_err": rel_err(report.total_norm.item(), ref["total"]),
        "group_err": {g: rel_err(report.group_norms[g].item(), v) for g, v in ref["groups"].items()},
        "grad_err": grad_error(trainer, seen["held"], ref),
        "clipped_groups": sorted(g for g, c in ref["coefs"].items() if c < 1.0),
        "logged_grad_norm": logged.get("grad_norm"),
        "logged_distclip": {k: v for k, v in logged.items() if k.startswith(integration.METRIC_PREFIX)},
        "group_norms": {g: v.item() for g, v in report.group_norms.items()},
    }


def disabled_record(trainer: Any, step: int) -> dict[str, Any]:
    """``--distclip.no-enable``: train_step runs torchtitan's own clip, once, and distclip's not at all."""
    trainer.config.distclip = integration.DistclipSection(enable=False)
    calls = {"torchtitan": 0, "distclip": 0}
    original, routed = tt_dist_utils.clip_grad_norm_, trainer.distclip_clip_grad_norm_

    def torchtitan_clip(*args: Any, **kwargs: Any) -> Any:
        calls["torchtitan"] += 1
        return original(*args, **kwargs)

    def distclip_clip(*args: Any, **kwargs: Any) -> Any:
        calls["distclip"] += 1
        return routed(*args, **kwargs)

    tt_dist_utils.clip_grad_norm_ = torchtitan_clip
    trainer.distclip_clip_grad_norm_ = distclip_clip
    try:
        trainer.step = step
        trainer.metrics_processor.data_loading_times = [0.0]
        trainer.train_step(harness.data_iterator(trainer, step))
    finally:
        tt_dist_utils.clip_grad_norm_ = original
        del trainer.distclip_clip_grad_norm_
    return calls


def same_state(a: Any, b: Any) -> bool:
    """Exact equality of two state dicts (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint_record(trainer: Any, held: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An adaptive (ZClip) clipper's state through torchtitan's own CheckpointManager (its ``distclip``
    entry): saved, then loaded into a clipper rebuilt afresh; and a checkpoint saved without it (plain
    torchtitan) resumed with ``exclude_from_loading=["distclip"]``."""
    use_section(trainer, {"max_norm": SMALL, "groups": groups(trainer.layout_model),
                          "policy": {"kind": "zclip", "warmup_steps": 1}})
    params = [q for part in trainer.model_parts for q in part.parameters()]
    for _ in range(3):  # the EMA state moves
        trainer.distclip_clip_grad_norm_(params, SMALL)
        restore(trainer, held)
    checkpointer = trainer.checkpointer
    step = trainer.step
    before = trainer.grad_clipper.state_dict()
    checkpointer.save(curr_step=step)
    trainer.grad_clipper = trainer.build_grad_clipper()
    fresh = trainer.grad_clipper.state_dict()
    checkpointer.load(step=step)
    after = trainer.grad_clipper.state_dict()
    entry = checkpointer.states.pop(integration.CHECKPOINT_KEY)  # a torchtitan checkpoint without distclip
    checkpointer.save(curr_step=step + 1)
    checkpointer.states[integration.CHECKPOINT_KEY] = entry
    trainer.grad_clipper = trainer.build_grad_clipper()
    checkpointer.exclude_from_loading = [integration.CHECKPOINT_KEY]
    checkpointer.load(step=step + 1)
    return {"steps_before": before["steps"], "fresh_steps": fresh["steps"], "steps_after": after["steps"],
            "fresh_differs": not same_state(before, fresh), "equal": same_state(before, after),
            "saved_keys": sorted(checkpointer.states), "excluded_steps": trainer.grad_clipper.steps}


def run_layout(layout: harness.Layout, checkpoint_dir: str | None = None) -> dict[str, Any]:
    """Everything one launch checks for ``layout`` (runs inside each rank)."""
    harness.use_cpu()
    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def lap(what: str) -> None:
        now = time.perf_counter()
        seconds[what] = round(now - clock[0], 2)
        clock[0] = now

    trainer = harness.build_trainer(harness.trainer_config(layout), checkpoint_dir=checkpoint_dir)
    lap("build")
    trainer.layout_model = layout.model
    if layout.synthetic:
        synthetic_grads(trainer)
    else:
        harness.forward_backward(trainer, step=1)
    lap("backward")
    full = harness.full_grads64(trainer)
    held = held_locals(trainer)
    lap("gather")
    out: dict[str, Any] = {"rank": dist.get_rank(), "layout": layout.name,
                           "elements": sum(t.numel() for t in full.values()),
                           "meshes": sorted({str(p.grad.device_mesh) for _, p in harness.named_params(trainer)
                                             if isinstance(p.grad, DTensor)})}
    out["distclip"] = [clip_record(trainer, c, full, held) for c in configs(layout.model)]
    lap("distclip sweep")
    out["torchtitan"] = [torchtitan_clip(trainer, p, full, held) for p in P_VALUES]
    lap("torchtitan clips")
    out["plain"] = plain_function(trainer, full, held)
    lap("plain function")
    if not layout.synthetic:
        out["train_step"] = train_step_record(trainer, configs(layout.model)[1], step=2)
        lap("train_step")
        if checkpoint_dir is not None:
            out["checkpoint"] = checkpoint_record(trainer, held)
            out["disabled"] = disabled_record(trainer, step=3)
            lap("checkpoint, disabled")
    out["seconds"] = seconds
    return out
