"""Hugging Face Trainer on 2 gloo ranks: one line (distclip.hf_trainer.enable) gives exact per-group clipping.

The model is built in the test (no download). The data collator records every batch each rank
trains on, so a float64 single process can replay the run (clip, then SGD) and give the exact
norms the Trainer must log.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distclip.testing import run_ranks
from tests.helpers.hf_trainer import train_recorded
from tests.helpers.models import SEQ, VOCAB, make_model
from tests.helpers.reference import reference_run, rel_err

import transformers  # noqa: E402,F401  (a dev dependency: missing, the tests fail)
from transformers import Trainer, TrainingArguments  # noqa: E402,F401  (imported before the ranks fork: faster)

pytestmark = pytest.mark.multiprocess

STEPS, LR, MAX_GRAD_NORM = 3, 0.5, 0.1
CONFIG = {"groups": [{"name": "embed", "match": ["net.embed.*"], "max_norm": 0.01},
                     {"name": "attn", "match": ["net.blocks.*.attn.*"], "max_norm": 0.05}]}


class TinyLM(nn.Module):
    """The shared TinyNet behind the interface the Trainer expects (a dict with the loss)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = make_model(dtype=dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(input_ids)
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1)), "logits": logits}


def dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, VOCAB, (SEQ,), generator=g),
             "labels": torch.randint(0, VOCAB, (SEQ,), generator=g)} for _ in range(n)]


def train_with_trainer(output_dir: str):
    from tests.helpers.accelerate_shim import reset_accelerate

    reset_accelerate()
    trainer, batches = train_recorded(TinyLM(), dataset(), CONFIG, output_dir, batch_size=4, steps=STEPS,
                                      max_grad_norm=MAX_GRAD_NORM, lr=LR)
    assert trainer.accelerator.num_processes == dist.get_world_size() == 2
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    return str(trainer.accelerator.distributed_type), logs, batches


def replay(batches_per_rank: list[list[dict[str, torch.Tensor]]]) -> list[dict]:
    """The same steps in one float64 process: mean loss over all ranks' batches, distclip semantics, SGD."""
    def step_loss(model: nn.Module, step: int) -> torch.Tensor:
        inputs = {k: torch.cat([rank[step][k] for rank in batches_per_rank]) for k in ("input_ids", "labels")}
        return model(**inputs)["loss"]

    return reference_run({"max_norm": MAX_GRAD_NORM, **CONFIG}, len(batches_per_rank), STEPS, LR,
                         make_model=TinyLM, step_loss=step_loss)


def test_trainer_max_grad_norm_is_exact_per_group_on_two_ranks(tmp_path):
    results = run_ranks(train_with_trainer, 2, str(tmp_path), timeout=300)
    mode, logs, batches = results[0]
    assert mode == "DistributedType.MULTI_CPU"
    assert not torch.equal(batches[0][0]["input_ids"], batches[1][0]["input_ids"])  # each rank its own data
    refs = replay(batches)
    for _, rank_logs, _ in results:
        assert [h["step"] for h in rank_logs] == list(range(1, STEPS + 1))
        for log, ref in zip(rank_logs, refs):
            assert rel_err(log["grad_norm"], ref["total"]) <= 1e-6, (log, ref["total"])
            for name, value in ref["groups"].items():
                assert rel_err(log[f"grad_norm/{name}"], value) <= 1e-6, (name, log, value)
            # per-group clipping happened: the embedding group was clipped to its own threshold
            assert log["clip_coef/embed"] < 1.0
        # the logs carry ClipReport.to_metrics()'s names; the clip rates count the steps so far
        thresholds = {"embed": 0.01, "attn": 0.05, "default": MAX_GRAD_NORM}
        clipped = dict.fromkeys(thresholds, 0)
        for step, (log, ref) in enumerate(zip(rank_logs, refs), 1):
            assert log["skipped"] == 0.0
            for name, threshold in thresholds.items():
                assert log[f"clip_threshold/{name}"] == pytest.approx(threshold)
                assert log[f"nonfinite/{name}"] == 0.0
                assert log[f"clipped/{name}"] == float(ref["groups"][name] + 1e-6 > threshold)
                clipped[name] += ref["groups"][name] + 1e-6 > threshold
                assert log[f"clip_rate/{name}"] == pytest.approx(clipped[name] / step)
        assert rank_logs == results[0][1]  # identical on every rank
