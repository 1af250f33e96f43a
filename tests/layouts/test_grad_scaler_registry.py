"""GradScaler with distclip: gradients reused across steps and a loss-scale overflow (single process)."""

from __future__ import annotations

import warnings

import torch

import distclip


def test_grad_scaler_reused_gradients_and_overflow():
    """The unscale registry is keyed by identity: a second unscale of the same gradient tensors
    (``zero_grad(set_to_none=False)``) and the overflow check after an unscale both work."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    clipper = distclip.GradClipper(model, max_norm=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, scale in enumerate((1.0, 1e38, 1.0)):  # the middle step overflows
            loss = model(torch.randn(2, 4) * scale).sum()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            reports.append(clipper.clip())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=False)  # the same gradient tensors next step
    assert [r.skip_reason for r in reports] == [None, "overflow", None]
    assert all(torch.isfinite(p).all() for p in model.parameters())
