"""distclip inside torchtitan 0.3.0 on 4 CPU ranks: its norms vs torchtitan's vs float64, and a few steps
of DistclipTrainer.train_step (torchtitan's own train_step, its clip call routed to distclip).

    python launch/torchtitan_example.py                 # every layout, then 3 train steps (about 1-2 min)
    python launch/torchtitan_example.py fsdp_tp pp_fsdp # some layouts
    python launch/torchtitan_example.py train           # only the train steps

torchtitan's Trainer cannot start on CPU (it hard-codes CUDA), so this drives its pieces the way its
own graph-trainer tests do, with the CPU workarounds of tests/frameworks/torchtitan_harness.py (the
same harness the tests use). On GPUs none of that is needed: see docs/guides/torchtitan.md.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from distclip.testing import run_ranks
from tests.frameworks import torchtitan_checks as checks
from tests.frameworks import torchtitan_harness as harness
from tests.frameworks.test_torchtitan import LAYOUTS

DESCRIBE = {
    "fsdp_tp": "FSDP2 dp_shard=2 x TP=2, llama3 debug",
    "pp_fsdp": "PP=2 (Interleaved1F1B, 2 stages/rank) x FSDP2 dp_shard=2, llama3 debug",
    "ep_fsdp": "EP=2 in FSDP2 dp_shard=4, DeepSeek-V3 debug MoE",
    "cp_tp": "CP=2 x TP=2 parameter layout (no CPU backward: synthetic gradients), llama3 debug",
}


def table(result: dict) -> str:
    lines = [(f"{'p':>4}  {'float64 reference':>18}  {'distclip':>18} {'rel err':>8} {'coll':>4}  "
             f"{'torchtitan':>18} {'rel err':>8} {'coll':>4}")]
    uniform = {rec["config"]["norm_type"]: rec for rec in result["distclip"] if "groups" not in rec["config"]}
    for tt in result["torchtitan"]:
        dc = uniform[tt["p"]]
        p = "inf" if math.isinf(tt["p"]) else f"{tt['p']:g}"
        lines.append(f"{p:>4}  {dc['ref_total']:18.10f}  {dc['total']:18.10f} {dc['total_err']:8.1e} {dc['collectives']:4d}  "
                     f"{tt['total']:18.10f} {tt['err']:8.1e} {tt['collectives']:4d}")
    grouped = [rec for rec in result["distclip"] if "groups" in rec["config"]]
    worst = max(max(rec["group_err"].values()) for rec in grouped)
    lines.append(f"per group ({len(grouped)} configs, groups {grouped[0]['groups']}): largest group-norm error "
                 f"{worst:.1e}, largest clipped-gradient error {max(r['grad_err'] for r in result['distclip']):.1e}, "
                 f"collectives {sorted({r['collectives'] for r in grouped})}")
    return "\n".join(lines)


def train(steps: int) -> list[dict]:
    """A few DistclipTrainer.train_step calls (FSDP2 x TP), per-group config; torchtitan logs its line."""
    from torchtitan.tools.logging import init_logger

    harness.use_cpu()
    if int(os.environ["RANK"]) == 0:
        init_logger()
    else:
        logging.getLogger().setLevel(logging.ERROR)
    config = harness.trainer_config(LAYOUTS["fsdp_tp"], {"norm_type": 2.0, "groups": [
        {"name": "embeddings", "match": "tok_embeddings.*", "max_norm": 0.05},
        {"name": "attention", "match": "*.attention.*", "max_norm": 0.2}]})
    config.training.max_norm = 1.0  # the default group's threshold (distclip's config sets none)
    trainer = harness.build_trainer(config)
    trainer.grad_clipper = trainer.build_grad_clipper()
    for step in range(1, steps + 1):
        trainer.step = step
        trainer.metrics_processor.data_loading_times = [0.0]
        trainer.train_step(harness.data_iterator(trainer, step))
    return [metrics for _, metrics in trainer.metrics_logger.records]


def main(names: list[str], train_steps: int) -> None:
    for name in names:
        start = time.perf_counter()
        results = run_ranks(checks.run_layout, 4, LAYOUTS[name], None, timeout=600, collective_timeout=300)
        r0 = results[0]
        same = all(r["distclip"][i]["total"] == r0["distclip"][i]["total"] for r in results for i in range(len(r0["distclip"])))
        print(f"\n== {name}: {DESCRIBE[name]}; {r0['elements']:,} gradient elements; "
              f"bitwise equal on 4 ranks: {same}; {time.perf_counter() - start:.1f} s")
        print(table(r0))
    if train_steps:
        print("\n== DistclipTrainer.train_step, FSDP2 x TP, per-group config (torchtitan's log line, then what its "
              "metrics logger received from distclip)")
        records = run_ranks(train, 4, train_steps, timeout=600, collective_timeout=300)[0]
        for metrics in records:
            keys = sorted(k for k in metrics if k.startswith("distclip/") and ("grad_norm" in k or "clip_coef" in k))
            if keys:
                print("  " + "  ".join(f"{k}={metrics[k]:.4g}" for k in keys))


if __name__ == "__main__":
    wanted = [a for a in sys.argv[1:] if a in LAYOUTS]
    main(wanted if wanted or "train" in sys.argv else list(LAYOUTS),
         train_steps=3 if "train" in sys.argv or not sys.argv[1:] else 0)
