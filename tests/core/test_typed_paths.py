"""distclip ships ``py.typed``: a user's type checker must see the names of the stable import paths.

``distclip.deepspeed``, ``distclip.accelerate``... swap the real module in through ``sys.modules`` at import
time, which a type checker does not run: without their ``TYPE_CHECKING`` re-exports mypy reported
``Module "distclip.deepspeed" has no attribute "attach"`` for a user's correct code. mypy checks a small user
file here against this checkout (other packages skipped, so it takes seconds); a misspelt name must still be reported,
so the paths are not simply typed ``Any``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO

USER_CODE = """\
import distclip
import distclip.accelerate
import distclip.hf_trainer
from distclip.deepspeed import attach
from distclip.lightning import DistclipCallback
from distclip.mpi import init_process_group
from distclip.olmo_core import TOTAL_NORM_METRIC, DistclipCallback as OlmoCallback
from distclip.torchft import attach as torchft_attach
from distclip.torchtitan import DistclipTrainer

checked = (attach, DistclipCallback, init_process_group, TOTAL_NORM_METRIC, OlmoCallback, torchft_attach,
           DistclipTrainer, distclip.accelerate.enable, distclip.accelerate.last_report, distclip.hf_trainer.enable)
misspelt = distclip.accelerate.enabel  # the one error expected
"""


def test_stable_import_paths_are_seen_by_mypy(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    (tmp_path / "user.py").write_text(USER_CODE)
    config = tmp_path / "mypy.ini"
    config.write_text(textwrap.dedent(f"""\
        [mypy]
        mypy_path = {REPO}
        cache_dir = {tmp_path / "cache"}
        ignore_missing_imports = True
        # everything but distclip as Any: this test is about distclip's own module names (and stays fast)
        follow_imports = skip
        [mypy-distclip.*]
        follow_imports = normal
        """))
    stdout, stderr, status = api.run(["--config-file", str(config), "--no-error-summary", "--show-error-codes",
                                      str(tmp_path / "user.py")])
    # the user's file only: with torch as Any, distclip's own findings differ from `mypy distclip` (checked in CI)
    errors = [line for line in stdout.splitlines() if line.startswith(str(tmp_path / "user.py")) and ": error:" in line]
    assert len(errors) == 1 and "user.py:13:" in errors[0] and '"enabel"' in errors[0], (stdout, stderr, status)
