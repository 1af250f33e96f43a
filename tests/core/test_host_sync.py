"""No host round trip hidden in the per-step path: after warm-up, distclip builds no tensor from host data
during the reduction hooks and the clip, and syncs with the device only where documented.

Counted by wrapping the torch entry points that build tensors from Python data (``torch.tensor``,
``torch.as_tensor``) or bring device data to the host (``Tensor.item``, ``Tensor.tolist``,
``Tensor.__bool__``, ``Tensor.__float__``), and attributing each call to distclip when the calling
frame is in the distclip package. (Where a GPU is lent, the CUDA check runs the same step under
``torch.cuda.set_sync_debug_mode("error")``: ``launch/cuda_sync_check.py``.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.host_sync import BUILDERS, SYNCS, count_distclip_calls
from tests.helpers.models import batch, loss_fn, make_model

pytestmark = pytest.mark.multiprocess

def build(layout: str, config: dict):
    if layout == "ddp":
        model = DDP(make_model(), bucket_cap_mb=0.002)
        return model, distclip.GradClipper(model, config)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True)
        return model, distclip.GradClipper(model, config)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, distclip.GradClipper(model, config)


MODES = {"ignore": "ignore", "skip": "skip",
         "streak": {"action": "skip", "max_consecutive": 3}}  # grouped: with a measured-only, out-of-total group


def steps_after_warmup(layout: str, mode: str, grouped: bool, comm_hook: bool | str = True):
    embed = {"name": "embed", "match": ["embed.*"]}
    if mode == "streak":
        embed = {**embed, "max_norm": None, "in_total": False}
    config = {"max_norm": 0.05, "nonfinite": MODES[mode], "comm_hook": comm_hook, "skip_spikes": {"max_consecutive": 4} if mode == "streak" else None,
              "groups": [embed, {"name": "attn", "match": ["blocks.*.attn.*"]}] if grouped else []}
    model, clipper = build(layout, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper.attach(optimizer)
    rank = dist.get_rank()
    sources = []
    for step in range(3):  # warm-up: plans, device constants, DDP's bucket rebuild
        loss_fn(model, *batch(step, rank)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with count_distclip_calls() as counts:
        for step in range(3, 6):
            loss_fn(model, *batch(step, rank)).backward()  # the reduction hooks run in here
            optimizer.step()  # the clip runs in here
            optimizer.zero_grad(set_to_none=True)
            sources.append(clipper.last_report.source)
    return dict(counts), sources


LAYOUTS = ["ddp", "fsdp1", "fsdp2"]
# comm_hook: true forces each layout's reduction hook; the default (auto) measures DDP after backward on gloo
PATHS = {"true": (True, "comm_hook"), "auto": ("auto", "post_backward")}


def run_all():
    return {(layout, mode, grouped, path): steps_after_warmup(layout, mode, grouped, PATHS[path][0])
            for layout in LAYOUTS for mode in MODES for grouped in (False, True)
            for path in PATHS if path == "true" or layout == "ddp"}


def test_no_host_tensors_and_only_documented_syncs_after_warmup():
    for result in run_ranks(run_all, 2, timeout=300):
        assert len(result) == 24  # 3 layouts x 3 modes x 2 group layouts with the hook, and DDP's default path
        for (layout, mode, grouped, path), (counts, sources) in result.items():
            where = f"{layout}, nonfinite={mode}, {'per-group' if grouped else 'uniform'}, comm_hook {path}"
            assert sources == [PATHS[path][1]] * 3, (where, sources)  # the path meant is the one measured
            built = {k: v for k, v in counts.items() if k in BUILDERS}
            assert not built, f"{where}: tensors built from host data on the per-step path: {built}"
            syncs = {k: v for k, v in counts.items() if k in SYNCS}
            if mode == "ignore":  # torch semantics: never synchronises
                assert not syncs, f"{where}: host syncs {syncs}"
            else:  # the one documented sync per clip: the non-finite flag and which groups clip (streaks add none)
                assert syncs == {"Tensor.tolist": 3}, f"{where}: host syncs {syncs}"
