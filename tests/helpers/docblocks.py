"""The fenced code blocks of the README and the documentation, and what the doc test does with each.

The fence's info string decides (the first word is the language, as Markdown and MyST read it):

* ``python``: run on CPU, in a process of its own (:mod:`tests.helpers.docrunner`), from an empty
  working directory. A first line ``# ranks: N`` runs it on N ranks, as ``torchrun --nproc_per_node N``
  would (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set; the block calls
  ``init_process_group`` itself). ``# timeout: S`` (any of the first lines) gives it S seconds.
* ``python notest <reason>``: shown, not run; the reason is required (a GPU, a cluster, a framework's
  whole trainer, a fragment of the block above...), so that every skipped block says why.
* ``yaml`` / ``yml``: a distclip configuration, loaded with :meth:`distclip.ClipConfig.from_yaml` (a
  top-level ``distclip:`` section is used if present: Accelerate files with a distclip section load
  too). ``yaml notest <reason>`` for YAML that is not a distclip config.
* ``bash run`` / ``console run``: executed with bash from an empty working directory (``console``: the
  lines that start with ``$ ``); the block must exit 0. Other shell blocks are shown only.
* Anything else (``json``, ``text``, output, MyST directives such as ``{toctree}``): shown only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import REPO

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
RANKS = re.compile(r"^#\s*ranks:\s*(\d+)\b")  # "# ranks: 2  (torchrun --nproc_per_node 2 example.py)"
TIMEOUT = re.compile(r"^#\s*timeout:\s*(\d+)\b")
PYTHON = {"python", "py", "python3"}
YAML = {"yaml", "yml"}
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    path: Path  # the Markdown file
    line: int  # 1-based line of the opening fence
    lang: str  # first word of the info string, lower-case ("" for none)
    flags: tuple[str, ...]  # the other words of the info string
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def notest(self) -> bool:
        return bool(self.flags) and self.flags[0] == "notest"

    @property
    def reason(self) -> str:
        return " ".join(self.flags[1:]).strip(" ()-:")

    @property
    def action(self) -> str:
        """``python``, ``yaml``, ``shell`` (run), ``notest`` (skipped, with a reason) or ``show``."""
        if self.lang.startswith("{"):
            return "show"  # a MyST directive
        if self.notest and (self.lang in PYTHON or self.lang in YAML or self.lang in SHELL):
            return "notest"
        if self.lang in PYTHON:
            return "python"
        if self.lang in YAML:
            return "yaml"
        if self.lang in SHELL and "run" in self.flags:
            return "shell"
        return "show"

    def header(self, pattern: re.Pattern[str], default: int) -> int:
        """A ``# key: N`` comment among the first lines of the block."""
        for text in self.code.splitlines()[:5]:
            match = pattern.match(text.strip())
            if match:
                return int(match.group(1))
        return default

    @property
    def ranks(self) -> int:
        return self.header(RANKS, 1)

    @property
    def timeout(self) -> int:
        return self.header(TIMEOUT, 120)

    def shell_script(self) -> str:
        if self.lang == "console":
            return "\n".join(line[2:] for line in self.code.splitlines() if line.startswith("$ "))
        return self.code


def blocks_in(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, nested fences included (a longer fence holds shorter ones)."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    open_fence: tuple[str, int, str, int] | None = None  # (fence, line, info, indent)
    body: list[str] = []
    for number, text in enumerate(lines, 1):
        match = FENCE.match(text)
        if open_fence is None:
            if match and not (match["fence"][0] == "`" and "`" in match["info"]):
                open_fence = (match["fence"], number, match["info"].strip(), len(match["indent"]))
                body = []
            continue
        fence, start, info, indent = open_fence
        if (match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence)
                and not match["info"].strip()):
            words = info.split()
            lang = words[0].lower() if words else ""
            blocks.append(Block(path, start, lang, tuple(words[1:]), "\n".join(body) + "\n"))
            open_fence = None
            continue
        body.append(text[indent:] if text[:indent].isspace() else text)
    if open_fence is not None:
        raise ValueError(f"{path}:{open_fence[1]}: a code fence that never closes")
    return blocks


def doc_files() -> list[Path]:
    """README.md and every Markdown page of the documentation (not the build output)."""
    docs = REPO / "docs"
    pages = sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)
    return [REPO / "README.md", *pages]


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in blocks_in(path)]
