"""A real PEFT LoRA model under FSDP2 on 2 gloo ranks, by hand and through the HF Trainer (issue 19).

A tiny transformers Llama built from a config (no download), LoRA on q/v (PEFT 0.21):

* adapters sharded: ``get_peft_model`` then ``fully_shard``: every trainable gradient a DTensor on one mesh,
  frozen base weights in the same FSDP groups (torch's clip is right here: the baseline);
* adapters plain, norms trainable: ``fully_shard`` then ``get_peft_model`` (PEFT on a model sharded at load
  time): plain replicated adapters beside DTensor norms, where torch's clip raises;
* adapters plain only: every trainable gradient a whole copy on each rank: no collective is needed.

Each: p in {1, 2, 3.5, inf}, uniform and per group (groups mixing adapters and norms, and split by kind),
against the float64 reference, bitwise across ranks, and two steps with FSDP2's all-reduce hook.

Through the Trainer: transformers' own FSDP2 loading (``from_pretrained(distributed_config=...)``), then
PEFT, then ``distclip.hf_trainer.enable``. The Trainer would skip ``accelerator.clip_grad_norm_`` for
these mixed gradients (its own per-mesh 2-norm); the logged norms must be distclip's, per group, exact.
"""

from __future__ import annotations

import functools
from typing import Any

import peft  # noqa: F401  - a missing PEFT fails these tests, it does not skip them
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_grad_close
from tests.helpers.hf_trainer import train_recorded
from tests.helpers.mixed_models import average_plain_grads
from tests.helpers.nd_helpers import (
    MAX_NORM,
    check_sweep,
    configs,
    count_collectives,
    full_grads_dtensor,
    local_of,
    report_record,
    sweep,
)
from tests.helpers.peft_models import (
    SEQ,
    VOCAB,
    add_lora,
    adapters_plain,
    adapters_sharded,
    base_model,
    global_tokens,
    lm_loss,
    reference_model,
    tokens,
)
from tests.helpers.reference import norm64, reference_run, rel_err

pytestmark = pytest.mark.multiprocess

WORLD, LR = 2, 0.5
LORA_GROUPS = [{"name": "lora_A", "match": ["*.lora_A.*"], "max_norm": 0.005},
               {"name": "lora_B", "match": ["*.lora_B.*"], "max_norm": 1e3}]
MIXED_GROUPS = [  # adapters (plain) and the attention's norm (DTensor) in one group; the final norm: default
    {"name": "attention", "match": ["*.self_attn.*", "*.input_layernorm.*"], "max_norm": 0.005},
    {"name": "mlp_side", "match": ["*.post_attention_layernorm.*"], "max_norm": 1e3}]
SPLIT_GROUPS = [{"name": "lora", "match": ["*.lora_*"], "max_norm": 0.005},
                {"name": "norms", "match": ["*norm.weight"], "max_norm": 1e3}]
VARIANTS: dict[str, dict[str, Any]] = {
    "adapters_sharded": {"norms": False, "configs": configs(LORA_GROUPS), "groups": LORA_GROUPS},
    "adapters_plain_with_norms": {"norms": True, "configs": configs(MIXED_GROUPS) + configs(SPLIT_GROUPS),
                                  "groups": MIXED_GROUPS},
    "adapters_plain_only": {"norms": False, "configs": configs(LORA_GROUPS), "groups": LORA_GROUPS},
}


# ---------------------------------------------------------------------------------- inside the ranks
def build(name: str, mesh: Any) -> nn.Module:
    if name == "adapters_sharded":
        return adapters_sharded(mesh)
    return adapters_plain(mesh, train_norms=VARIANTS[name]["norms"])


def backward(model: nn.Module, step: int) -> None:
    lm_loss(model, tokens(step, dist.get_rank())).backward()
    average_plain_grads(model)  # the adapters FSDP2 does not manage (the HF Trainer's post-accumulate hook)


def local_grads(model: nn.Module) -> list[torch.Tensor]:
    return [local_of(p.grad) for p in model.parameters() if p.grad is not None]


def torch_clip(model: nn.Module) -> tuple[str, str] | float:
    """torch's own clip at p = 2 (gradients restored after): its norm, or the error it raised."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [g.clone() for g in local_grads(model)]
    try:
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, norm_type=2.0)
        out: tuple[str, str] | float = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    except Exception as err:  # noqa: BLE001 - what torch does is the result
        out = (type(err).__name__, str(err))
    with torch.no_grad():
        for g, s in zip(local_grads(model), saved):
            g.copy_(s)
    return out


def two_steps(name: str, model: nn.Module) -> list[dict[str, Any]]:
    model.zero_grad()
    clipper = distclip.GradClipper(model, {"max_norm": 0.02, "norm_type": 2.0, "groups": VARIANTS[name]["groups"],
                                           "comm_hook": True})  # the all-reduce hook, also on CPU
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    records = []
    for step in range(2):
        backward(model, step)
        report, collectives = count_collectives(clipper.clip)
        records.append({**report_record(report), "collectives": collectives, "grads": full_grads_dtensor(model)})
        opt.step()
        opt.zero_grad()
    return records


def run_variant(name: str, mesh: Any) -> dict[str, Any]:
    model = build(name, mesh)
    backward(model, 0)
    kinds = sorted({type(p.grad).__name__ for p in model.parameters() if p.grad is not None})
    result = sweep(lambda c: distclip.GradClipper(model, c), VARIANTS[name]["configs"], lambda: local_grads(model),
                   lambda: full_grads_dtensor(model))
    return {**result, "kinds": kinds, "torch": torch_clip(model), "steps": two_steps(name, model)}


def run_all() -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    return {name: run_variant(name, mesh) for name in VARIANTS}


@functools.cache
def results() -> list[dict[str, Any]]:
    return run_ranks(run_all, WORLD, timeout=300, env={"HF_HUB_OFFLINE": "1"})


@functools.cache
def reference(name: str) -> dict[str, torch.Tensor]:
    model = reference_model(VARIANTS[name]["norms"])
    lm_loss(model, global_tokens(0, WORLD)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(VARIANTS))
def test_peft_lora_on_fsdp2_matches_float64(name: str) -> None:
    per_rank = [r[name] for r in results()]
    expected_kinds = {"adapters_sharded": ["DTensor"], "adapters_plain_with_norms": ["DTensor", "Tensor"],
                      "adapters_plain_only": ["Tensor"]}[name]
    assert all(r["kinds"] == expected_kinds for r in per_rank), [r["kinds"] for r in per_rank]
    # every counted gradient a whole copy on each rank: each rank computes the same norm, no collective
    check_sweep(name, per_rank, VARIANTS[name]["configs"], reference(name),
                collectives=0 if name == "adapters_plain_only" else 1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_peft_lora_two_steps(name: str) -> None:
    """With FSDP2's all-reduce hook on: frozen base weights in the FSDP groups no longer turn it off."""
    refs = reference_run({"max_norm": 0.02, "norm_type": 2.0, "groups": VARIANTS[name]["groups"]}, WORLD, 2, LR,
                         make_model=lambda dtype: reference_model(VARIANTS[name]["norms"], dtype),
                         step_loss=lambda model, step: lm_loss(model, global_tokens(step, WORLD)))
    source, collectives = ("post_backward", 0) if name == "adapters_plain_only" else ("comm_hook", 1)
    for result in results():
        for step, (rec, ref) in enumerate(zip(result[name]["steps"], refs)):
            assert rec["source"] == source and rec["collectives"] == collectives, (name, step, rec["source"])
            assert rel_err(rec["total"], ref["total"]) <= 1e-5, (name, step, rec["total"], ref["total"])
            for group, value in ref["groups"].items():
                assert rel_err(rec["groups"][group], value) <= 1e-5, (name, step, group, rec["groups"][group], value)
            for param, grad in ref["clipped"].items():
                assert_grad_close(rec["grads"][param], grad, 1e-5)


def test_torch_clip_raises_on_plain_adapters_beside_trainable_dtensors() -> None:
    """The negative control: right where every trainable gradient is of one kind, raises on the mix."""
    for result in results():
        for name in ("adapters_sharded", "adapters_plain_only"):
            exact = norm64(list(reference(name).values()), 2.0)
            assert isinstance(result[name]["torch"], float) and rel_err(result[name]["torch"], exact) <= 1e-5, name
        kind, message = result["adapters_plain_with_norms"]["torch"]
        assert kind == "RuntimeError" and "mixed torch.Tensor and DTensor" in message, message


# ---------------------------------------------------------------------------------- the HF Trainer
STEPS, MAX_GRAD_NORM = 3, 0.1
TRAINER_CONFIG = {"groups": MIXED_GROUPS}


def dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    items = [torch.randint(0, VOCAB, (SEQ,), generator=g) for _ in range(n)]
    return [{"input_ids": ids, "labels": ids.clone()} for ids in items]


def train_with_trainer(model_dir: str, output_dir: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from tests.helpers.accelerate_shim import reset_accelerate

    reset_accelerate()
    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(fsdp_size=WORLD),
                                                 dtype=torch.float32)
    model = add_lora(model, train_norms=True)  # PEFT on a model transformers sharded at load time
    kinds = sorted({type(p).__name__ for p in model.parameters() if p.requires_grad})
    trainer, batches = train_recorded(model, dataset(), TRAINER_CONFIG, output_dir, batch_size=2, steps=STEPS,
                                      max_grad_norm=MAX_GRAD_NORM, lr=LR)
    return {"kinds": kinds, "logs": [h for h in trainer.state.log_history if "grad_norm" in h], "batches": batches}


def test_hf_trainer_with_peft_on_a_model_sharded_at_load(tmp_path) -> None:
    model_dir = tmp_path / "tiny-llama"
    base_model().save_pretrained(model_dir)
    results = run_ranks(train_with_trainer, WORLD, str(model_dir), str(tmp_path / "out"), timeout=300,
                        env={"HF_HUB_OFFLINE": "1"})
    batches = results[0]["batches"]
    assert not torch.equal(batches[0][0]["input_ids"], batches[1][0]["input_ids"])  # each rank its own data
    refs = reference_run({"max_norm": MAX_GRAD_NORM, **TRAINER_CONFIG}, WORLD, STEPS, LR,
                         make_model=lambda dtype: reference_model(True, dtype),
                         step_loss=lambda model, step: lm_loss(model, torch.cat([b[step]["input_ids"] for b in batches])))
    for result in results:
        assert result["kinds"] == ["DTensor", "Parameter"], result["kinds"]  # the mixed layout
        logs = result["logs"]
        assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
        for log, ref in zip(logs, refs):
            # distclip's norms, per group (the Trainer's own mixed-mesh path logs one 2-norm and no groups)
            assert rel_err(log["grad_norm"], ref["total"]) <= 1e-5, (log, ref["total"])
            for group, value in ref["groups"].items():
                assert rel_err(log[f"grad_norm/{group}"], value) <= 1e-5, (group, log, value)
            assert log["clip_coef/attention"] < 1.0 and log["clip_coef/mlp_side"] == 1.0, log
        assert logs == results[0]["logs"]  # identical on every rank
