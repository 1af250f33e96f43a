"""Every runnable code block of the README and the documentation runs, so a renamed API breaks the build.

Blocks are read from README.md and docs/**/*.md (:mod:`tests.helpers.docblocks` says what each fence
means): ``python`` blocks run on CPU in a process of their own (``# ranks: N``: on N ranks, as under
torchrun), ``yaml`` blocks load as distclip configs, ``bash run``/``console run`` blocks run with bash.
A block that cannot run here says so in its fence (``python notest <reason>``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.docblocks import Block, all_blocks, blocks_in, doc_files
from tests.helpers.docrunner import ENV, DocRunner

BLOCKS = all_blocks()
PYTHON = [b for b in BLOCKS if b.action == "python"]
YAML = [b for b in BLOCKS if b.action == "yaml"]
SHELL = [b for b in BLOCKS if b.action == "shell"]


def ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


@pytest.fixture(scope="module")
def runner():
    server = DocRunner()
    yield server
    server.close()


@pytest.mark.multiprocess
@pytest.mark.parametrize("block", PYTHON, ids=ids(PYTHON))
def test_python_block_runs(block: Block, runner: DocRunner, request: pytest.FixtureRequest) -> None:
    if "deepspeed" in block.code:
        request.getfixturevalue("deepspeed_ops")  # built once per session, before any rank starts
    result = runner.run(block.code, ranks=block.ranks, timeout=block.timeout)
    assert result.ok, f"{block.where}: the code block failed ({block.ranks} rank(s)):\n{result.explain()}"


@pytest.mark.parametrize("block", YAML, ids=ids(YAML))
def test_yaml_block_is_a_valid_config(block: Block, tmp_path: Path) -> None:
    from distclip import ClipConfig

    path = tmp_path / "config.yaml"
    path.write_text(block.code)
    ClipConfig.from_yaml(path)  # raises ConfigError naming the key, the value and what is allowed


@pytest.mark.parametrize("block", SHELL, ids=ids(SHELL))
def test_shell_block_runs(block: Block) -> None:
    env = {**os.environ, **ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="distclip-doc-") as workdir:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.shell_script()], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=block.timeout, check=False)
    assert proc.returncode == 0, f"{block.where}: exit status {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_skipped_blocks_say_why() -> None:
    """``notest`` needs a reason in the fence: ``python notest (needs a GPU)``."""
    silent = [b.where for b in BLOCKS if b.action == "notest" and not b.reason]
    assert not silent, f"code blocks marked notest without a reason: {silent}"


def test_the_extraction_sees_the_blocks(tmp_path: Path) -> None:
    """The reader finds what a Markdown renderer finds: fences of any length, nested fences, info words."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\n# ranks: 2\nprint(1)\n```\n\n````markdown\n```python\nnot a block\n```\n````\n\n"
                    "```python notest (a fragment)\nloss.backward()\n```\n\n```yaml\nmax_norm: 1.0\n```\n\n"
                    "```{toctree}\npage\n```\n\n```console run\n$ true\nout\n```\n")
    found = blocks_in(page)
    assert [(b.line, b.action) for b in found] == [(3, "python"), (8, "show"), (14, "notest"), (18, "yaml"),
                                                    (22, "show"), (26, "shell")]
    assert found[0].ranks == 2 and found[0].code == "# ranks: 2\nprint(1)\n"
    assert found[2].reason == "a fragment"
    assert found[5].shell_script() == "true"


def test_every_page_is_read() -> None:
    files = doc_files()
    assert REPO / "README.md" in files and REPO / "docs" / "index.md" in files
    assert len(PYTHON) >= 10, "the documentation should hold runnable examples"
