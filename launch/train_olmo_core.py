"""A real OLMo-core 3.0.0 run with distclip's Trainer callback (docs/guides/olmo_core.md), on CPU or GPU.

    torchrun --nproc-per-node=4 launch/train_olmo_core.py             # FSDP2 (dp=2) x TP (tp=2), distclip
    torchrun --nproc-per-node=4 launch/train_olmo_core.py --olmo-clip # the same run, OLMo-core's own clip

A tiny llama-like Transformer trained for a few steps on random tokens written to a temporary
folder; OLMo-core's console logger prints the metrics every step. On CPU it uses gloo; on GPUs nccl.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from olmo_core.config import DType
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.distributed.utils import get_rank
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train import (
    Duration,
    TrainerConfig,
    prepare_training_environment,
    teardown_training_environment,
)
from olmo_core.train.callbacks import ConsoleLoggerCallback
from olmo_core.train.train_module import (
    TransformerDataParallelConfig,
    TransformerTensorParallelConfig,
    TransformerTrainModuleConfig,
)
from olmo_core.utils import seed_all

from distclip.olmo_core import DistclipCallback

CLIP = {  # per-group thresholds, ZClip on every group: the distclip section of your config
    "max_norm": 1.0,
    "groups": [
        {"name": "embed", "match": ["embeddings.*"], "max_norm": 0.5},
        {"name": "attention", "match": ["blocks.*.attention.*"]},
        {"name": "mlp", "match": ["blocks.*.feed_forward.*"]},
    ],
    "policy": {"kind": "zclip", "warmup_steps": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--olmo-clip", action="store_true", help="OLMo-core's own clip (max_grad_norm=1.0) instead")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    prepare_training_environment(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", shared_filesystem=True)
    workdir = tempfile.mkdtemp(prefix="distclip-olmo-") if get_rank() == 0 else None
    workdir = _broadcast(workdir)
    seed_all(0)

    model = TransformerConfig.llama_like(d_model=64, n_layers=2, n_heads=4, vocab_size=512).build(init_device="meta")
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=32, max_sequence_length=32,
        optim=AdamWConfig(lr=1e-2),
        max_grad_norm=1.0 if args.olmo_clip else None,  # distclip clips: OLMo-core's own clip off
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp, param_dtype=DType.float32,
                                                reduce_dtype=DType.float32),
        tp_config=TransformerTensorParallelConfig(degree=2),
    ).build(model)
    if get_rank() == 0:
        np.random.default_rng(0).integers(2, 512, size=32 * 1024, dtype=np.uint16).tofile(f"{workdir}/tokens.npy")
    torch.distributed.barrier()
    dataset = NumpyFSLDatasetConfig(paths=[f"{workdir}/tokens.npy"], sequence_length=32,
                                    tokenizer=TokenizerConfig(vocab_size=512, eos_token_id=0, pad_token_id=1),
                                    work_dir=f"{workdir}/cache").build()
    loader = NumpyDataLoaderConfig(global_batch_size=4 * 32, seed=0, num_workers=0).build(
        dataset, dp_process_group=train_module.dp_process_group)

    trainer_config = TrainerConfig(save_folder=f"{workdir}/run", max_duration=Duration.steps(args.steps),
                                   metrics_collect_interval=1, no_checkpoints=True, no_evals=True)
    # The console shows a subset of the metrics (W&B / Comet get them all): add distclip's "optim/*".
    trainer_config = trainer_config.with_callback(
        "console_logger", ConsoleLoggerCallback(metrics=["train/CE loss", "optim/*"]))
    if not args.olmo_clip:
        trainer_config = trainer_config.with_callback("distclip", DistclipCallback(config=CLIP))
    trainer_config.build(train_module, loader).fit()
    teardown_training_environment()


def _broadcast(value: str | None) -> str:
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    assert box[0] is not None
    return box[0]


if __name__ == "__main__":
    main()
