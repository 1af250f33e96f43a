"""OLMo-core 3.0.0: ``distclip.olmo_core.DistclipCallback`` inside the real ``Trainer.fit``, 4 gloo ranks.

Three launches (plus one for the resume), each a real OLMo-core ``Trainer.fit`` of a tiny llama-like
``Transformer`` on a token file written here:

* FSDP2 x TP (dp=2 x tp=2, ``TransformerTrainModule``), 10 steps: OLMo-core's own clip
  (``max_grad_norm=X``) and then DistclipCallback (``max_grad_norm=None``, ``max_norm: X``), with
  ``SkipStepAdamW`` and 2 micro-batches per step; then a straight run with per-group ZClip that
  saves a checkpoint at step 3 of 6.
* The resume: NEW processes load that checkpoint and continue to step 6.
* Pipeline (pp=2 x fsdp=2, interleaved 1F1B, 2 virtual stages per rank): OLMo-core's
  ``TransformerPipelineTrainModule`` (its stage split, its FSDP2 per stage, its ``optim_step`` and
  ``_clip_grad_norm``), whose 3.0.0 schedule driver cannot train (see
  :class:`TorchSchedulePipelineTrainModule`): the driver is OLMo-core 2.5's thin wrapper around
  torch's schedule, everything else is OLMo-core 3.0.0's.

Checked: losses and total norms equal OLMo-core's own clipping (1e-6 relative); the norm equals a
float64 reference of the gathered gradients (1e-6, :mod:`tests.helpers.reference`, no distclip code), also
for p = inf, 1.5 and per-group mixes on the same gradients; clipped gradients equal the reference's;
norms bitwise identical on every rank; 1 collective per clip against OLMo-core's 2; metrics under
OLMo-core's names; the skip-step optimizer fed; a resume in new processes bitwise equal to the
straight run (norms, thresholds, losses, parameters, clipper state).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

# OLMo-core is imported at module top: if it cannot be imported, these tests fail (never skip).
import numpy as np
import olmo_core.distributed.parallel as olmo_parallel
import pytest
import torch
import torch.distributed as dist
from olmo_core.config import DType
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.distributed.parallel import DataParallelType, PipelineScheduleType
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig, SkipStepAdamWConfig, SkipStepOptimizer
from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
from olmo_core.train.callbacks import Callback, CheckpointerCallback
from olmo_core.train.common import OPTIM_GRAD_NORM_METRIC, TRAIN_CE_LOSS_METRIC
from olmo_core.train.train_module import (
    TransformerDataParallelConfig,
    TransformerPipelineParallelConfig,
    TransformerPipelineTrainModule,
    TransformerTensorParallelConfig,
    TransformerTrainModule,
    TransformerTrainModuleConfig,
)
from olmo_core.utils import seed_all
from torch.distributed.pipelining import ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

import distclip
from distclip.olmo_core import TOTAL_NORM_METRIC, DistclipCallback
from distclip.testing import run_ranks
from tests.helpers.nd_helpers import count_collectives
from tests.helpers.reference import reference_clip, rel_err

WORLD, SEQ, VOCAB = 4, 32, 512
STEPS = 10
TP_MAX = 0.5  # below every FSDP2 x TP norm (about 0.9-1.1): every step clips
PP_MAX = 0.2  # below the pipeline model's norms (about 0.25-0.4)
GROUPS = [
    {"name": "embed", "match": ["embeddings.*"]},
    {"name": "attention", "match": ["blocks.*.attention.*"]},
    {"name": "mlp", "match": ["blocks.*.feed_forward.*"]},
]  # norms and the LM head: "default"
SWEEP = [  # measured on the gradients of step 1 (no clipping): other p, per group, mixed norm types
    {"max_norm": 0.1, "norm_type": math.inf},
    {"max_norm": 0.1, "norm_type": 1.5, "groups": GROUPS},
    {"max_norm": 0.1, "norm_type": 2.0,
     "groups": [{**g, "norm_type": q} for g, q in zip(GROUPS, (math.inf, 1.0, 3.5))]},
]
RESUME_CONFIG = {  # per group thresholds and ZClip: the clipper's state decides the thresholds after step 2
    "max_norm": 0.6,
    "groups": [{**GROUPS[0], "max_norm": 0.3}, {**GROUPS[1], "max_norm": 0.4}, GROUPS[2]],
    "policy": {"kind": "zclip", "warmup_steps": 2, "z_thresh": 0.3, "alpha": 0.8},
}
RESUME_AT, RESUME_STEPS = 3, 6
TOKENIZER = TokenizerConfig(vocab_size=VOCAB, eos_token_id=0, pad_token_id=1)


# ============================================================ rank side: building a real OLMo-core run
class TorchSchedulePipelineTrainModule(TransformerPipelineTrainModule):
    """OLMo-core 3.0.0's pipeline train module with OLMo-core 2.5's schedule driver.

    3.0.0 cannot train with its own driver, on any device: ``PipelineSchedule`` accepts only its
    custom schedules (``distributed/parallel/pipeline_parallel.py:797``), whose
    ``CustomPipelineStage.forward_one_chunk`` asserts the last stage returns ``LMOutputWithLoss``
    (``train_module/transformer/pipeline/pipeline_stage.py:252``), while this module's own
    ``run_pipeline`` hook replaces that output by ``loss.unsqueeze(0)``
    (``pipeline_train_module.py:659``): the dry-run batch fails (flagged in OLMo-core PR #749's
    review). On CPU it also needs CUDA (``pipeline/pipeline_schedule.py:279`` builds a
    ``torch.cuda.Stream``, ``:303`` ``torch.cuda.current_device()``) and bf16 activations
    (``pipeline_stage.py:118``). 2.5's driver is a thin wrapper around torch's schedules over
    torch's ``PipelineStage`` (``use_custom_stage_implementation=False``), which this module's
    ``run_pipeline`` was written for; only ``pre_train`` changes.
    """

    def pre_train(self) -> None:
        n_microbatches = self.trainer.global_batch_size // self.dp_world_size // self.rank_microbatch_size
        self._train_pp_schedule = _TorchPipelineSchedule(self._pp_stages, n_microbatches, self.loss_fn)


class _TorchPipelineSchedule:
    """OLMo-core 2.5's ``PipelineSchedule`` (``distributed/parallel/pipeline_parallel.py``), multi-stage case."""

    def __init__(self, stages: list, n_microbatches: int, loss_fn: Any):
        self.stages = stages
        self.base_schedule = ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        self.has_last_stage = any(s.is_last for s in stages)

    def step(self, *args: Any, target: torch.Tensor | None = None, **kwargs: Any) -> Any:
        losses: list | None = [] if self.has_last_stage else None
        output = self.base_schedule.step(*args, target=target if self.has_last_stage else None, losses=losses, **kwargs)
        return output, None if losses is None else torch.stack(losses)


def _trainer(workdir: str, layout: str, *, max_grad_norm: float | None, optim: Any, steps: int,
             callbacks: dict[str, Callback], checkpoint_at: int | None = None) -> Any:
    """A real OLMo-core Trainer: tiny llama, NumpyFSLDataset over the test's tokens, FSDP2 x TP or PP x FSDP2.

    OLMo-core builds one world mesh per process (``build_world_mesh`` refuses a second); this test runs
    several trainers per process, so it forgets the previous one first (test scaffolding only)."""
    olmo_parallel._WORLD_MESH = None
    seed_all(0)
    pipeline = layout == "pp"
    model = TransformerConfig.llama_like(d_model=64, n_layers=4 if pipeline else 2, n_heads=4,
                                         vocab_size=VOCAB).build(init_device="meta")
    dp = TransformerDataParallelConfig(name=DataParallelType.fsdp, param_dtype=DType.float32,
                                       reduce_dtype=DType.float32)
    if pipeline:
        config = TransformerTrainModuleConfig(
            rank_microbatch_size=SEQ, max_sequence_length=SEQ, optim=optim, max_grad_norm=max_grad_norm, dp_config=dp,
            pp_config=TransformerPipelineParallelConfig(degree=2, schedule=PipelineScheduleType.interleaved_1F1B))
        train_module = TorchSchedulePipelineTrainModule(model=model, device=torch.device("cpu"),
                                                        **config.as_dict(exclude_none=True, recurse=False))
        batch = 8  # 4 sequences per data-parallel rank: 4 micro-batches in the pipeline
    else:
        train_module = TransformerTrainModuleConfig(
            rank_microbatch_size=SEQ, max_sequence_length=SEQ, optim=optim, max_grad_norm=max_grad_norm, dp_config=dp,
            tp_config=TransformerTensorParallelConfig(degree=2)).build(model, device=torch.device("cpu"))
        batch = 4  # 2 sequences per data-parallel rank: 2 micro-batches (gradient accumulation)
    dataset = NumpyFSLDatasetConfig(paths=[f"{workdir}/tokens.npy"], sequence_length=SEQ, tokenizer=TOKENIZER,
                                    work_dir=f"{workdir}/dataset-cache").build()
    loader = NumpyDataLoaderConfig(global_batch_size=batch * SEQ, seed=0, num_workers=0).build(
        dataset, dp_process_group=train_module.dp_process_group)
    all_callbacks = dict(callbacks)
    if checkpoint_at is not None:
        all_callbacks["checkpointer"] = CheckpointerCallback(save_interval=checkpoint_at, save_async=False)
    return TrainerConfig(save_folder=f"{workdir}/checkpoints", max_duration=Duration.steps(steps),
                         no_checkpoints=checkpoint_at is None, no_evals=True,
                         callbacks=all_callbacks).build(train_module, loader)


def _full_grads(train_module: Any) -> dict[str, torch.Tensor] | None:
    """Every gradient of the model as a full float64 tensor, on rank 0 (None elsewhere): ``full_tensor``
    within each stage, then the stages' dicts gathered over the world."""
    parts = getattr(train_module, "model_parts", None) or [train_module.model]
    mine = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double()
            for part in parts for n, p in part.named_parameters() if p.grad is not None}
    if len(parts) == 1 and not hasattr(train_module, "pp_group"):
        return mine if dist.get_rank() == 0 else None
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return None if gathered is None else {n: g for d in gathered for n, g in d.items()}


def _full_params(train_module: Any) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in train_module.model.named_parameters()}


class _Records:
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}
        self.metrics: dict[int, dict[str, float]] = {}

    def at(self, step: int) -> dict[str, Any]:
        return self.steps.setdefault(step, {})


class _Before(Callback):
    """First in ``pre_optim_step``: the float64 reference of the gradients, before any clip (rank 0);
    at step 1 (with ``sweep``), distclip's norms of them in other configs."""

    priority = 100

    def __init__(self, records: _Records, config: dict[str, Any], sweep: bool = False):
        self.records, self.config, self.sweep = records, config, sweep
        self.grads: dict[str, torch.Tensor] | None = None

    def pre_optim_step(self) -> None:
        tm = self.trainer.train_module
        self.grads = _full_grads(tm)
        rec = self.records.at(self.step)
        if self.grads is not None:
            ref = reference_clip(self.grads, self.config)
            rec["ref_total"], rec["ref_groups"] = ref["total"], ref["groups"]
        if self.sweep and self.step == 1:
            rec["sweep_grads"] = self.grads
            rec["sweep"] = [_measure(tm, config) for config in SWEEP]


def _measure(train_module: Any, config: dict[str, Any]) -> dict[str, Any]:
    """A distclip measurement (no clipping) of the train module's gradients in another config."""
    if hasattr(train_module, "pp_group"):
        clipper = distclip.GradClipper(list(train_module.train_pp_schedule.stages), {**config, "comm_hook": False},
                                       pipeline_group=train_module.pp_group)
    else:
        clipper = distclip.GradClipper(train_module.model, {**config, "comm_hook": False})
    report, collectives = count_collectives(clipper.measure)
    return {"total": report.total_norm.item(), "groups": {k: v.item() for k, v in report.group_norms.items()},
            "collectives": collectives}


class _After(Callback):
    """Last in ``pre_optim_step``, after DistclipCallback: its report gathered from every rank, the clipped
    gradients against the reference's, what the skip-step optimizer was given."""

    priority = -200

    def __init__(self, records: _Records, distclip_cb: DistclipCallback, before: _Before | None = None):
        self.records, self.cb, self.before = records, distclip_cb, before  # before: check the clipped gradients

    def pre_optim_step(self) -> None:
        report = self.cb.last_report
        rec = self.records.at(self.step)
        values = torch.stack([report.total_norm, *report.group_norms.values()]).float()
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, values)
        rec["ranks"] = [g.tolist() for g in gathered]
        rec["total"] = report.total_norm.item()
        rec["groups"] = {k: v.item() for k, v in report.group_norms.items()}
        rec["coefs"] = {k: v.item() for k, v in report.coefs.items()}
        rec["thresholds"] = {k: v.item() for k, v in report.thresholds.items()}
        loss = self.trainer.get_metric(TRAIN_CE_LOSS_METRIC)  # this rank's loss, before OLMo-core reduces it
        rec["local_loss"] = None if loss is None else loss.item()
        rec["skip_fed"] = [o.latest_grad_norm is report.total_norm for o in _optimizers(self.trainer.train_module)
                           if isinstance(o, SkipStepOptimizer)]
        if self.step == RESUME_AT:
            rec["state"] = copy.deepcopy(self.cb.clipper.state_dict())
        if self.before is not None:
            clipped = _full_grads(self.trainer.train_module)
            if clipped is not None:
                expected = reference_clip(self.before.grads, self.before.config)["clipped"]
                rec["grad_err"] = max((clipped[n] - e).abs().max().item() / e.abs().max().item()
                                      for n, e in expected.items())


def _optimizers(train_module: Any) -> list:
    return list(getattr(train_module, "optimizers", None) or [train_module.optim])


class _Metrics(Callback):
    """What OLMo-core's metric logging hands every callback, per step."""

    def __init__(self, records: _Records):
        self.records = records

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.records.metrics.setdefault(step, {}).update(metrics)  # a checkpoint save logs a step in two parts


class _CountingDistclip(DistclipCallback):
    """DistclipCallback with the collectives of each ``pre_optim_step`` counted (CommDebugMode)."""

    def pre_optim_step(self) -> None:
        _, n = count_collectives(super().pre_optim_step)
        self.__dict__.setdefault("collectives", []).append(n)


def _count_olmo_clip(train_module: Any) -> list[int]:
    """Count the collectives of OLMo-core's own clip (its ``_clip_grad_norm``, called by ``optim_step``)."""
    counts: list[int] = []
    clip = train_module._clip_grad_norm

    def counted(*args: Any, **kwargs: Any) -> Any:
        out, n = count_collectives(lambda: clip(*args, **kwargs))
        counts.append(n)
        return out

    train_module._clip_grad_norm = counted
    return counts


def _olmo_run(workdir: str, layout: str, max_norm: float, optim: Any) -> dict[str, Any]:
    """OLMo-core's own clipping (``max_grad_norm=max_norm``), with the float64 reference of each step."""
    records = _Records()
    before = _Before(records, {"max_norm": max_norm})
    trainer = _trainer(workdir, layout, max_grad_norm=max_norm, optim=optim, steps=STEPS,
                       callbacks={"before": before, "metrics": _Metrics(records)})
    try:  # nothing may clip twice: DistclipCallback refuses a train module that clips by itself
        trainer.add_callback("distclip", DistclipCallback(config={"max_norm": max_norm}))
        refusal = None
    except distclip.ConfigError as err:
        refusal = str(err)
        del trainer.callbacks["distclip"]
    counts = _count_olmo_clip(trainer.train_module)
    trainer.fit()
    return {"records": records, "collectives": counts, "refusal": refusal}


def _distclip_run(workdir: str, layout: str, max_norm: float, optim: Any) -> dict[str, Any]:
    records = _Records()
    before = _Before(records, {"max_norm": max_norm}, sweep=True)
    cb = _CountingDistclip(config={"max_norm": max_norm})
    trainer = _trainer(workdir, layout, max_grad_norm=None, optim=optim, steps=STEPS,
                       callbacks={"before": before, "distclip": cb, "after": _After(records, cb, before),
                                  "metrics": _Metrics(records)})
    trainer.fit()
    return {"records": records, "collectives": cb.__dict__.get("collectives", [])}


def _resume_run(workdir: str, resume: bool) -> dict[str, Any]:
    """Per-group ZClip, RESUME_STEPS steps: straight (saving at step RESUME_AT), or resumed from that checkpoint."""
    records = _Records()
    cb = DistclipCallback(config=RESUME_CONFIG)
    callbacks = {"distclip": cb, "after": _After(records, cb), "metrics": _Metrics(records)}
    trainer = _trainer(workdir, "fsdp_tp", max_grad_norm=None, optim=AdamWConfig(lr=1e-2), steps=RESUME_STEPS,
                       callbacks=callbacks, checkpoint_at=None if resume else RESUME_AT)
    loaded = None
    if resume:
        trainer.load_checkpoint(f"{workdir}/checkpoints/step{RESUME_AT}")
        loaded = copy.deepcopy(cb.state_dict())  # restored before the clipper exists (built at the first epoch)
    trainer.fit()
    return {"records": records, "params": _full_params(trainer.train_module), "loaded": loaded,
            "final_state": cb.clipper.state_dict()}


def _rank_fsdp_tp(workdir: str) -> dict[str, Any]:
    prepare_training_environment(backend="gloo", shared_filesystem=True)
    # A short rolling window and a low sigma: the skip-step optimizer decides from the norms it is fed
    # (lr 1e-3: see _rank_pipeline).
    optim = SkipStepAdamWConfig(lr=1e-3, rolling_interval_length=4, sigma_factor=1)
    return {"olmo": _olmo_run(workdir, "fsdp_tp", TP_MAX, optim),
            "distclip": _distclip_run(workdir, "fsdp_tp", TP_MAX, optim),
            "straight": _resume_run(workdir, resume=False)}


def _rank_resume(workdir: str) -> dict[str, Any]:
    prepare_training_environment(backend="gloo", shared_filesystem=True)
    return _resume_run(workdir, resume=True)


def _rank_pipeline(workdir: str) -> dict[str, Any]:
    prepare_training_environment(backend="gloo", shared_filesystem=True)
    # lr 1e-3: at 1e-2 this pipeline's 10 steps amplify any difference in the clip coefficient about 10x
    # per step (both runs deterministic, each norm within 2e-7 of the float64 norm of its own gradients):
    # fp32 rounding (1e-7) in OLMo-core's coefficient grew to 2e-5 in the loss by step 9 (FSDP2 x TP:
    # 5e-7 in the norm by step 9). Comparing two implementations needs a run that does not amplify it.
    optim = AdamWConfig(lr=1e-3)
    return {"olmo": _olmo_run(workdir, "pp", PP_MAX, optim), "distclip": _distclip_run(workdir, "pp", PP_MAX, optim)}


def _launch(fn: Any, workdir: str) -> list[dict[str, Any]]:
    return run_ranks(fn, WORLD, workdir, timeout=300, collective_timeout=120, env={"OMP_NUM_THREADS": "1"})


def _write_tokens(workdir: str) -> str:
    rng = np.random.default_rng(0)
    rng.integers(2, VOCAB, size=32 * 1024, dtype=np.uint16).tofile(os.path.join(workdir, "tokens.npy"))
    return workdir


# ==================================================================== launches (once per module)
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write_tokens(str(tmp_path_factory.mktemp("olmo-core")))


@pytest.fixture(scope="module")
def fsdp_tp(workdir: str) -> list[dict[str, Any]]:
    return _launch(_rank_fsdp_tp, workdir)


@pytest.fixture(scope="module")
def resumed(workdir: str, fsdp_tp: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _launch(_rank_resume, workdir)  # new processes, from the straight run's checkpoint


@pytest.fixture(scope="module")
def pipeline(workdir: str) -> list[dict[str, Any]]:
    return _launch(_rank_pipeline, workdir)


# ======================================================================================== checks
def _check_against_olmo(results: list[dict[str, Any]], max_norm: float, olmo_collectives: int) -> None:
    """Losses and norms equal OLMo-core's clipping; norms equal float64; bitwise across ranks; 1 collective."""
    olmo, ours = results[0]["olmo"]["records"], results[0]["distclip"]["records"]
    assert set(range(1, STEPS + 1)) <= set(ours.metrics) & set(olmo.metrics), (sorted(ours.metrics), sorted(olmo.metrics))
    for step in range(1, STEPS + 1):
        o, d, rec = olmo.metrics[step], ours.metrics[step], ours.steps[step]
        where = f"step {step}"
        assert rel_err(d[TRAIN_CE_LOSS_METRIC], o[TRAIN_CE_LOSS_METRIC]) <= 1e-6, (where, d, o)
        assert rel_err(d[OPTIM_GRAD_NORM_METRIC], o[OPTIM_GRAD_NORM_METRIC]) <= 1e-6, (where, d, o)
        assert rel_err(rec["total"], rec["ref_total"]) <= 1e-6, (where, rec["total"], rec["ref_total"])
        assert rel_err(olmo.metrics[step][OPTIM_GRAD_NORM_METRIC], olmo.steps[step]["ref_total"]) <= 1e-5, where
        assert d[TOTAL_NORM_METRIC] == rec["total"], where  # the metric IS distclip's norm
        assert d["optim/grad norm/default"] == rec["groups"]["default"] and d["optim/clip skipped"] == 0.0, where
        assert d["optim/clip threshold/default"] == torch.tensor(max_norm).item(), where  # fp32, as reported
        assert d["optim/clip coef/default"] == rec["coefs"]["default"] < 1.0, where
        assert rec["coefs"]["default"] < 1.0, (where, rec)  # the threshold clipped ...
        assert rec["grad_err"] <= 1e-6, (where, rec["grad_err"])  # ... the gradients, exactly
        assert all(r == rec["ranks"][0] for r in rec["ranks"]), (where, rec["ranks"])  # bitwise on every rank
    for r in results:
        assert r["distclip"]["collectives"] == [1] * STEPS, r["distclip"]["collectives"]
        assert r["olmo"]["collectives"] == [olmo_collectives] * STEPS, r["olmo"]["collectives"]


def _check_sweep(results: list[dict[str, Any]]) -> None:
    """p = inf, 1.5 and per-group mixed norm types on step 1's gradients: float64 within 1e-6, 1 collective."""
    rec = results[0]["distclip"]["records"].steps[1]
    for config, got in zip(SWEEP, rec["sweep"]):
        ref = reference_clip(rec["sweep_grads"], config)
        assert got["collectives"] == 1, (config, got)
        assert rel_err(got["total"], ref["total"]) <= 1e-6, (config, got, ref["total"])
        assert set(got["groups"]) == set(ref["groups"]), (config, got)
        for group, value in ref["groups"].items():
            assert rel_err(got["groups"][group], value) <= 1e-6, (config, group, got["groups"][group], value)


def test_fsdp_tp_equals_olmo_clip_and_float64(fsdp_tp: list[dict[str, Any]]) -> None:
    _check_against_olmo(fsdp_tp, TP_MAX, olmo_collectives=2)  # full_tensor over dp, then over tp


def test_fsdp_tp_other_norms_and_groups(fsdp_tp: list[dict[str, Any]]) -> None:
    _check_sweep(fsdp_tp)


def test_fsdp_tp_feeds_the_skip_step_optimizer(fsdp_tp: list[dict[str, Any]]) -> None:
    """SkipStepAdamW gets distclip's norm before step(), as OLMo's own clip gives it its own: same skip decisions."""
    olmo, ours = fsdp_tp[0]["olmo"]["records"], fsdp_tp[0]["distclip"]["records"]
    for step in range(1, STEPS + 1):
        assert ours.steps[step]["skip_fed"] == [True], (step, ours.steps[step]["skip_fed"])
    skipped = [ours.metrics[s]["optim/step skipped"] for s in range(1, STEPS + 1)]
    assert skipped == [olmo.metrics[s]["optim/step skipped"] for s in range(1, STEPS + 1)]
    assert 0 < sum(skipped) < STEPS, skipped  # the norms decided something


def test_refuses_olmo_own_clip(fsdp_tp: list[dict[str, Any]]) -> None:
    refusal = fsdp_tp[0]["olmo"]["refusal"]
    assert refusal is not None and "max_grad_norm=None" in refusal and f"max_norm: {TP_MAX}" in refusal, refusal


def test_resume_in_new_processes_is_bitwise(fsdp_tp: list[dict[str, Any]], resumed: list[dict[str, Any]]) -> None:
    straight, again = fsdp_tp[0]["straight"], resumed[0]
    saved = straight["records"].steps[RESUME_AT]["state"]
    assert _same(again["loaded"], {"distclip": saved})  # the checkpoint carried the clipper's state
    for step in range(RESUME_AT + 1, RESUME_STEPS + 1):
        s, r = straight["records"], again["records"]
        for key in ("total", "groups", "thresholds", "coefs"):
            assert r.steps[step][key] == s.steps[step][key], (step, key, r.steps[step][key], s.steps[step][key])
        # Each rank's loss (the logged mean can differ in its last bit: OLMo-core's bookkeeping all-reduces
        # a vector of several steps' metrics at once, and gloo's ring sums an element in an order that
        # depends on the vector's length)
        for rank in range(WORLD):
            ours, theirs = resumed[rank]["records"].steps[step], fsdp_tp[rank]["straight"]["records"].steps[step]
            assert ours["local_loss"] is not None and ours["local_loss"] == theirs["local_loss"], (step, rank)
        metrics = {TOTAL_NORM_METRIC: r.steps[step]["total"]}
        for group in ("embed", "attention", "mlp", "default"):
            metrics[f"optim/grad norm/{group}"] = r.steps[step]["groups"][group]
            metrics[f"optim/clip coef/{group}"] = r.steps[step]["coefs"][group]
            metrics[f"optim/clip threshold/{group}"] = r.steps[step]["thresholds"][group]
        for name, value in metrics.items():  # per group, under OLMo-core's namespace, equal in both runs
            assert r.metrics[step][name] == s.metrics[step][name] == value, (step, name)
    assert straight["params"].keys() == again["params"].keys()
    for name, value in straight["params"].items():
        assert torch.equal(value, again["params"][name]), name
    assert _same(again["final_state"], straight["final_state"])
    # The state mattered: after the warm-up ZClip set thresholds below the caps from its EMA, which a
    # fresh state (warming up again: thresholds = caps) would not have.
    caps = {"embed": 0.3, "attention": 0.4, "mlp": 0.6, "default": 0.6}
    adaptive = [(step, g) for step in range(RESUME_AT + 1, RESUME_STEPS + 1)
                for g, t in straight["records"].steps[step]["thresholds"].items() if t < caps[g] - 1e-7]
    assert adaptive, straight["records"].steps


def test_pipeline_equals_olmo_clip_and_float64(pipeline: list[dict[str, Any]]) -> None:
    _check_against_olmo(pipeline, PP_MAX, olmo_collectives=2)  # full_tensor over dp, all-reduce over pp


def test_pipeline_other_norms_and_groups(pipeline: list[dict[str, Any]]) -> None:
    _check_sweep(pipeline)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


# ================================================================ the callback itself (one process)
class _FakeTrainer:
    def __init__(self, train_module: Any):
        self.train_module = train_module


def test_callback_is_an_olmo_core_config_citizen(tmp_path: Any) -> None:
    """Serialisable with the experiment config, deep-copied by with_callback, a bad config fails at once."""
    config = {"max_norm": 0.5, "groups": GROUPS, "policy": {"kind": "zclip", "warmup_steps": 5}}
    trainer_config = TrainerConfig(save_folder=str(tmp_path)).with_callback("distclip", DistclipCallback(config=config))
    copied = copy.deepcopy(trainer_config)
    as_dict = copied.as_config_dict()["callbacks"]["distclip"]
    assert as_dict["config"] == config and as_dict["group_metrics"] is True, as_dict
    assert "clipper" not in as_dict and "_pending_state" not in as_dict
    path = tmp_path / "clip.yaml"
    path.write_text("max_norm: 0.25\nnorm_type: inf\n")
    assert DistclipCallback(config=str(path))._clip_config.max_norm == 0.25
    with pytest.raises(distclip.ConfigError, match="max_norm"):
        DistclipCallback(config={"max_norm": -1.0})


def test_state_before_the_clipper_exists() -> None:
    """OLMo-core loads checkpoints before the first epoch: the state waits for the clipper; a checkpoint
    written without distclip leaves it alone."""
    cb = DistclipCallback(config={"max_norm": 1.0})
    assert cb.state_dict() == {} and cb.clipper is None and cb.last_report is None
    cb.load_state_dict({})  # a checkpoint written without distclip
    assert cb.state_dict() == {}
    state = {"version": 2, "groups": ["default"], "steps": 3, "policy": {"kind": "fixed"}}
    cb.load_state_dict({"distclip": state})
    assert cb.state_dict() == {"distclip": state}


def test_refuses_train_modules_it_cannot_clip() -> None:
    from olmo_core.train.train_module import OLMoDDPTrainModule

    cb = DistclipCallback(config={"max_norm": 1.0})
    cb.trainer = _FakeTrainer(object.__new__(OLMoDDPTrainModule))
    with pytest.raises(distclip.UsageError, match="OLMoDDPOptimizer"):
        cb.post_attach()
    clipping = TransformerTrainModule.__new__(TransformerTrainModule)
    clipping.max_grad_norm = 1.0
    cb.trainer = _FakeTrainer(clipping)
    with pytest.raises(distclip.ConfigError, match="max_grad_norm=None"):
        cb.pre_train()
