"""Reading a clip log (the JSONL a :class:`~distclip.JSONLSink` writes) for ``distclip plot`` and ``suggest``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..core.sinks import HEADER_KEY
from ..errors import ClipLogError


@dataclass
class ClipLog:
    """One run's clip metrics: the header (config and groups) and the records, in step order."""

    path: str
    header: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        """Group names, in the order the clipper reports them."""
        if self.header and self.header.get("groups"):
            return [g["name"] for g in self.header["groups"]]
        seen: dict[str, None] = {}
        for record in self.records[:1]:
            for key in record:
                if key.startswith("grad_norm/"):
                    seen[key.split("/", 1)[1]] = None
        return list(seen)

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.records]

    def series(self, key: str) -> list[float]:
        """The value of ``key`` at every record (NaN where a record lacks it)."""
        return [_number(r.get(key)) for r in self.records]


def read_clip_log(path: str | os.PathLike) -> ClipLog:
    """Parse a clip log. A file appended by several runs yields the last run (after its header)."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        raise ClipLogError(f"{name}: no such file (write one with log: {{jsonl: {name}}} in the distclip config, "
                           "or clipper.add_sink(distclip.JSONLSink(path)))") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ClipLogError(f"{name}: cannot be read: {err}") from None
    log = ClipLog(name, None)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # a run killed mid-write leaves a partial last line: the rest is fine
                break
            raise ClipLogError(f"{name}:{number}: not a JSON line ({err.msg}); expected one object per line") from None
        if not isinstance(record, dict):
            raise ClipLogError(f"{name}:{number}: expected a JSON object, got {type(record).__name__}")
        if HEADER_KEY in record and "step" not in record:
            log = ClipLog(name, record[HEADER_KEY] if isinstance(record[HEADER_KEY], dict) else None)
            continue
        if not isinstance(record.get("step"), int) or not any(k.startswith("grad_norm/") for k in record):
            raise ClipLogError(f"{name}:{number}: not a distclip clip record (expected 'step' and 'grad_norm/<group>' "
                               f"keys, as ClipReport.to_metrics() writes), got keys {sorted(record)[:6]}")
        log.records.append(record)
    if not log.records:
        raise ClipLogError(f"{name}: holds no clip records (did the run clip at least once, and write every N clips "
                           "with N <= the number of steps?)")
    log.records.sort(key=lambda r: r["step"])
    return log


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return math.nan
