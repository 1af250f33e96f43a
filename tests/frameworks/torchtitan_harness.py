"""Drive torchtitan 0.3.0's own pieces on CPU gloo ranks (its Trainer hard-codes CUDA).

torchtitan's ``Trainer.__init__`` cannot run on CPU: ``torchtitan/tools/utils.py:55`` picks
``"cuda"`` when no accelerator is present, so ``trainer.py:301`` calls ``torch.cuda.set_device``;
with that patched, its metrics processor reads ``device_module.get_device_name``
(``components/metrics.py:42``), which ``torch.cpu`` lacks; and its tokenizer and ``c4_test``
dataset are repository test assets the wheel does not ship. So, as its
graph-trainer tests do (``experiments/graph_trainer/tests/_trainer_test_utils.py``), a trainer is
built with ``object.__new__`` and given what ``Trainer.__init__`` would give it, built by
torchtitan's own code: ``ParallelDims.build_mesh``, the model registry's debug model and
``parallelize_fn`` (or ``pipelining_fn`` = ``pipeline_llm`` with its schedule), its loss, its
optimizer and LR scheduler containers, its ``MetricsProcessor.log`` (with a recording logger).
Its ``forward_backward_step`` and ``train_step`` are then torchtitan's own code, unchanged.

CPU workarounds (each one line here, none in torchtitan):

* ``device_type, device_module = "cpu", torch.cpu`` in the modules that copied them at import;
* ``parallelism.spmd_backend = "full_dtensor"`` (the default ``spmd_types`` fails in ``fully_shard``
  on torch 2.13 with "all parameters must be DTensors");
* every layer's FlexAttention swapped for its ``ScaledDotProductAttention.Config()`` (FlexAttention
  has no CPU backward), as ``experiments/graph_trainer/common_utils.py:70`` does;
* ``FSDPModule.set_force_sum_reduction_for_comms(True)`` (torchtitan sets a gradient divide factor,
  which needs PREMUL_SUM; gloo lacks it; the numbers are the same).

And one torch-version shim, not a CPU one: torchtitan 0.3.0's ``pp_forward_backward_step`` calls
``pp_schedule.step(arg_mbs=..., kwarg_mbs=..., target_mbs=..., losses=..., loss_kwargs=...,
return_outputs=False)`` (``torchtitan/trainer.py:856``), a schedule API newer than torch 2.13.0,
whose ``step(*args, target=None, **kwargs)`` passes ``arg_mbs`` on to the model ("Decoder.forward()
got an unexpected keyword argument 'arg_mbs'"). :func:`microbatch_step_shim` gives the schedule that
API: torch 2.13's own per-step reset from ``step`` then its ``_step_microbatches`` on the
microbatches torchtitan split.

Models are shrunk for CI (fewer layers; the debug flavors' own widths), which changes nothing
about the layouts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torchtitan.distributed.parallel_dims as tt_parallel_dims
import torchtitan.distributed.utils as tt_dist_utils
import torchtitan.tools.utils as tt_utils
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.components.metrics import BaseLogger, MetricsProcessor
from torchtitan.distributed import ParallelDims
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel
from torchtitan.models.llama3.config_registry import llama3_debugmodel

from distclip.integrations.torchtitan import DistclipTrainer, with_distclip

VOCAB = 2048  # the debug flavors' vocabulary
SEQ_LEN = 16
LOCAL_BATCH = 2


def use_cpu() -> None:
    """torchtitan's device globals, which it copied into several modules at import, set to CPU."""
    tt_utils.device_type, tt_utils.device_module = "cpu", torch.cpu
    tt_parallel_dims.device_type = "cpu"
    tt_dist_utils.device_type, tt_dist_utils.device_module = "cpu", torch.cpu


@dataclass
class Layout:
    """One torchtitan parallelism layout on 4 ranks (``ParallelismConfig`` degrees)."""

    name: str
    model: str = "llama3"  # llama3 | deepseek_v3
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    schedule: str = "1F1B"
    backend: str = "full_dtensor"
    n_layers: int = 2
    attention: str = "sdpa"  # sdpa (runs a CPU backward) | flex (torchtitan's default; CPU forward only)
    synthetic: bool = False  # gradients set without a backward (a layout whose attention has no CPU backward)
    extra: dict[str, Any] = field(default_factory=dict)


CONFIGS: dict[str, Callable[[], Any]] = {"llama3": llama3_debugmodel, "deepseek_v3": deepseek_v3_debugmodel}


def trainer_config(layout: Layout, distclip: dict[str, Any] | None = None) -> Any:
    """torchtitan's registry config for the layout's model, with the layout and the CPU workarounds,
    turned into a :class:`DistclipTrainer.Config` (``distclip`` settings; None: the defaults)."""
    config = CONFIGS[layout.model]()
    p = config.parallelism
    p.spmd_backend = layout.backend
    p.data_parallel_replicate_degree = layout.dp_replicate
    p.data_parallel_shard_degree = layout.dp_shard
    p.tensor_parallel_degree = layout.tp
    p.pipeline_parallel_degree = layout.pp
    p.expert_parallel_degree = layout.ep
    p.context_parallel_degree = layout.cp
    p.pipeline_parallel_schedule = layout.schedule
    p.pipeline_parallel_microbatch_size = 1
    for key, value in layout.extra.items():
        setattr(p, key, value)
    config.training.seq_len = SEQ_LEN
    config.training.local_batch_size = LOCAL_BATCH
    config.training.disable_cuda_graphs = True  # no CUDA here (and torchtitan refuses them under PP)
    config.training.max_norm = 0.05  # below the debug models' norms: torchtitan's clip clips too
    config.activation_checkpoint = None
    model = config.model_spec.model
    model.layers = model.layers[: layout.n_layers]
    if layout.attention == "sdpa":
        for layer in model.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    if isinstance(config.loss, ChunkedLossWrapper.Config):
        config.loss.num_chunks = 2
    return with_distclip(config, distclip or {})


class RecordingLogger(BaseLogger):
    """torchtitan's logger interface (``log(metrics, step)``), keeping what it is given."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, Any]]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.records.append((step, dict(metrics)))


def metrics_processor(parallel_dims: ParallelDims, logger: BaseLogger) -> MetricsProcessor:
    """torchtitan's MetricsProcessor with its CUDA memory monitor replaced (``log`` is its own code)."""
    mp = object.__new__(MetricsProcessor)
    mp.config = MetricsProcessor.Config(log_freq=1)
    mp.logger = logger
    mp.parallel_dims = parallel_dims
    mp.device_memory_monitor = SimpleNamespace(
        get_peak_stats=lambda: SimpleNamespace(max_active_gib=0.0, max_active_pct=0.0, max_reserved_gib=0.0,
                                               max_reserved_pct=0.0, num_alloc_retries=0, num_ooms=0),
        reset_peak_stats=lambda: None)
    mp.color = tt_utils.NoColor()
    mp.gpu_peak_flops = 1.0
    mp.ntokens_since_last_log = 0
    mp.data_loading_times = [0.0]
    mp.time_last_log = time.perf_counter()
    mp.num_flops_per_token = 1
    mp.has_quantization = False
    mp.optimizers = mp.model_parts = None
    return mp


def microbatch_step_shim(schedule: Any) -> None:
    """``schedule.step(arg_mbs=..., ...)`` as torchtitan 0.3.0 calls it, on torch 2.13.0's schedules."""
    stages = list(getattr(schedule, "_stages", None) or [schedule._stage])

    def step(*, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, loss_kwargs=None, return_outputs=True):
        for stage in stages:  # what torch 2.13's step() does before running the microbatches
            stage.has_backward = schedule._has_backward
            stage.clear_runtime_states()
        schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs=loss_kwargs)

    schedule.step = step


class NoDataloaderState:
    """The dataloader entry of torchtitan's checkpoint (there is no dataloader here: batches are made by hand)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def build_trainer(config: Any, trainer_cls: type = DistclipTrainer, seed: int = 0,
                  checkpoint_dir: str | None = None) -> Any:
    """A trainer holding what ``Trainer.__init__`` builds (torchtitan's code for each piece), on CPU.

    ``checkpoint_dir``: build torchtitan's own CheckpointManager there (as ``Trainer.__init__`` does);
    else a stub. Then ``DistclipTrainer.setup_distclip`` (what its ``__init__`` adds: the clipper, and
    its checkpoint entry)."""
    use_cpu()
    trainer = object.__new__(trainer_cls)
    trainer.config = config
    trainer.device = torch.device("cpu")
    parallel_dims = ParallelDims.from_config(config.parallelism, dist.get_world_size())
    parallel_dims.build_mesh()
    tt_dist_utils.set_spmd_backend(config.parallelism.spmd_backend)
    trainer.parallel_dims = parallel_dims
    model_spec = config.model_spec
    model_config = model_spec.model
    model_config.update_from_config(config=config)
    trainer.model_config = model_config
    with torch.device("meta"):
        model = model_config.build()
    trainer.loss_fn = config.loss.build(compile_config=config.compile)
    common = {"parallel_dims": parallel_dims, "training": config.training, "parallelism": config.parallelism,
                  "compile_config": config.compile, "ac_config": config.activation_checkpoint, "dump_folder": "/tmp"}
    if parallel_dims.pp_enabled:
        trainer.pp_schedule, trainer.model_parts, trainer.pp_has_first_stage, trainer.pp_has_last_stage = (
            model_spec.pipelining_fn(model, **common, device=trainer.device, model_config=model_config,
                                     parallelize_fn=model_spec.parallelize_fn, loss_fn=trainer.loss_fn))
        microbatch_step_shim(trainer.pp_schedule)
    else:
        trainer.model_parts = [model_spec.parallelize_fn(model, **common)]
        trainer.pp_has_first_stage = trainer.pp_has_last_stage = True
    torch.manual_seed(seed)  # the same initial weights on every rank (DTensor init is rank-aware)
    for part in trainer.model_parts:
        part.to_empty(device="cpu")
        with torch.no_grad():
            part.init_weights(buffer_device=None)
        part.train()
        for m in part.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    if isinstance(trainer.loss_fn, ChunkedLossWrapper) and trainer.pp_has_last_stage:
        trainer.loss_fn.set_lm_head(trainer.model_parts[-1].lm_head)
        trainer.model_parts[-1]._skip_lm_head = True
    trainer.optimizers = config.optimizer.build(model_parts=trainer.model_parts)
    if model_spec.post_optimizer_build_fn is not None:
        model_spec.post_optimizer_build_fn(trainer.optimizers, trainer.model_parts, parallel_dims)
    trainer.lr_schedulers = config.lr_scheduler.build(optimizers=trainer.optimizers, training_steps=config.training.steps)
    trainer.metrics_logger = RecordingLogger()
    trainer.metrics_processor = metrics_processor(parallel_dims, trainer.metrics_logger)
    if checkpoint_dir is None:
        trainer.checkpointer = SimpleNamespace(maybe_wait_for_staging=lambda: None)
    else:
        config.checkpoint.enable = True
        config.checkpoint.interval = 1  # every save() call saves
        trainer.checkpointer = config.checkpoint.build(
            dataloader=NoDataloaderState(), model_parts=trainer.model_parts, optimizers=trainer.optimizers,
            lr_schedulers=trainer.lr_schedulers, states={"train_state": trainer}, sd_adapter=None,
            base_folder=checkpoint_dir)
    trainer.step = trainer.ntokens_seen = 0
    trainer.gradient_accumulation_steps = 1
    trainer.num_pipeline_parallel_microbatches = (
        config.training.local_batch_size // config.parallelism.pipeline_parallel_microbatch_size
        if parallel_dims.pp_enabled else 1)
    trainer.train_context = tt_dist_utils.get_spmd_context(parallel_dims=parallel_dims)
    trainer.fwd_bwd_fn = trainer._forward_backward_body
    if hasattr(trainer, "setup_distclip"):
        trainer.setup_distclip()  # what DistclipTrainer.__init__ adds after Trainer.__init__
    return trainer


def batches(trainer: Any, step: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """This rank's microbatches of one step: tokens that depend on the step and the batch (DP) rank only."""
    pd = trainer.parallel_dims
    batch_rank = pd.get_mesh("batch").get_local_rank() if pd.dp_enabled else 0
    g = torch.Generator().manual_seed(1000 * step + batch_rank)
    tokens = torch.randint(0, VOCAB, (LOCAL_BATCH, SEQ_LEN + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    extra = {}
    if pd.cp_enabled:  # torchtitan's CP input sharding needs the positions (its dataloader gives them)
        extra["positions"] = torch.arange(SEQ_LEN).expand(LOCAL_BATCH, SEQ_LEN).contiguous()
    if not pd.pp_enabled:
        return [({"input": inputs, **extra}, labels)]
    mb = trainer.config.parallelism.pipeline_parallel_microbatch_size
    return [({"input": inputs[i:i + mb], **{k: v[i:i + mb] for k, v in extra.items()}}, labels[i:i + mb])
            for i in range(0, LOCAL_BATCH, mb)]


def forward_backward(trainer: Any, step: int) -> None:
    """torchtitan's own ``forward_backward_step`` (its PP schedule under PP) on this step's batch."""
    for opt in trainer.optimizers.optimizers:
        opt.zero_grad(set_to_none=True)
    mbs = batches(trainer, step)
    valid = torch.tensor(sum(int(lab.numel()) for _, lab in mbs), dtype=torch.int64)
    pd = trainer.parallel_dims
    gvt = tt_dist_utils.dist_sum_tensor(valid, pd.get_mesh("batch")) if pd.dp_enabled else valid
    if pd.pp_enabled:
        trainer.forward_backward_step(input_dict=[d for d, _ in mbs], labels=[lab for _, lab in mbs],
                                      global_valid_tokens=gvt)
    else:
        trainer.forward_backward_step(input_dict=mbs[0][0], labels=mbs[0][1], global_valid_tokens=gvt)


def data_iterator(trainer: Any, step: int):
    """What ``Trainer.batch_generator`` yields for ``train_step``: one microbatch at a time."""
    yield from batches(trainer, step)


# ----------------------------------------------------------------------- gradients, the test's own way
def named_params(trainer: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """Every (name, parameter) of this rank's model parts (a pipeline split keeps the full model's names)."""
    return [(n, p) for part in trainer.model_parts for n, p in part.named_parameters()]


def local_grads(trainer: Any) -> list[torch.Tensor]:
    """This rank's local gradient tensors (the local shard of DTensor gradients)."""
    return [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            for _, p in named_params(trainer) if p.grad is not None]


def full_grads64(trainer: Any) -> dict[str, torch.Tensor]:
    """Every gradient of the whole model as a full float64 tensor, on every rank.

    ``full_tensor()`` of each DTensor gradient (collectives over its own mesh), then, under pipeline
    parallelism, an all_gather_object over the pipeline group: each stage's gradients by name.
    """
    mine = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().double().clone()
            for n, p in named_params(trainer) if p.grad is not None}
    pd = trainer.parallel_dims
    if not pd.pp_enabled:
        return mine
    gathered: list[Any] = [None] * pd.pp
    dist.all_gather_object(gathered, mine, group=pd.get_mesh("pp").get_group())
    out: dict[str, torch.Tensor] = {}
    for stage in gathered:
        out.update(stage)
    return out


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30) if math.isfinite(b) else float(a != b)
