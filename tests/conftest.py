"""Shared fixtures. Helper modules (the float64 reference, checks, models, launch and DeepSpeed helpers)
are in ``tests/helpers/``; test modules import from there, never from each other.

Layout: ``core/`` (one process: config, policies, kernels, reports, structure), ``layouts/`` (each
gradient layout on gloo ranks), ``nd/`` (N-D parallelism), ``deepspeed/``, ``integrations/``
(Accelerate, Lightning, HF Trainer), ``frameworks/`` (torchtitan, OLMo-core, torchft), ``cli/``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed's shm comm op, built (or loaded from ``~/.cache/torch_extensions``) once per session in a
    subprocess, before any rank starts: DeepSpeed JIT-builds it on its first initialisation (1-2 min)."""
    import deepspeed  # noqa: F401  - a missing DeepSpeed fails these tests, it does not skip them

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # forked ranks inherit it; silences DeepSpeed's probe
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "import distclip.deepspeed as d; d.build_ops()"],
                          timeout=900, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building DeepSpeed's deepspeed_shm_comm op failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
