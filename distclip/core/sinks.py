"""Where clip metrics go: the sink protocol, JSONL and TensorBoard sinks, and :class:`MetricsLog`.

A sink has two methods, as torchtitan's loggers (``BaseLogger`` / ``TensorBoardLogger``)::

    sink.write(metrics: dict[str, float], step: int)   # one clip's ClipReport.to_metrics()
    sink.close()

and may have ``start(info)``, called once before its first write with the clipper's config and
groups (the JSONL sink writes it as its first line, so ``distclip suggest`` can rebuild the config),
and ``write_details(metrics, details, step)`` for a bad step's attribution (which parameters and
ranks hold its NaN / inf, :meth:`ClipReport.details`): the JSONL sink puts both in one line, the
TensorBoard sink adds the details as text; a sink without it gets ``write(metrics, step)``. A bad
step with an attribution is written whether or not a write is due (it is rare, and it is the line
one looks for).

:class:`MetricsLog` decides, in one place, which rank writes (rank 0 of the clipper's reduce
group: the numbers are identical on every rank) and when (every N clips). Only a due write
reads the metrics from the device (one host sync, on the writing rank only).
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

import torch.distributed as dist

from .errors import UsageError, require_extra

if TYPE_CHECKING:
    from .config import LogSpec
    from .report import ClipReport

__all__ = ["MetricSink", "BaseSink", "JSONLSink", "TensorBoardSink", "CallbackSink", "MetricsLog", "HEADER_KEY"]

HEADER_KEY = "distclip"  # the JSONL header line: {"distclip": {"config": ..., "groups": [...]}}


@runtime_checkable
class MetricSink(Protocol):
    """Anything with ``write(metrics, step)`` and ``close()``."""

    def write(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class BaseSink:
    """A sink that writes nothing (the base of the others; torchtitan's ``BaseLogger``)."""

    def start(self, info: Mapping[str, Any]) -> None:
        """Called once before the first write with ``{"config": ..., "groups": [...]}``."""

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def write_details(self, metrics: Mapping[str, float], details: Mapping[str, Any], step: int) -> None:
        """A bad step: its metrics and where its non-finite values are (default: the metrics only)."""
        self.write(metrics, step)

    def close(self) -> None:
        pass


class JSONLSink(BaseSink):
    """One JSON object per write, ``{"step": N, **metrics}``, flushed at once (a crash keeps every line).

    The file (and its folder) is created at the first write, afresh unless ``append``. Non-finite
    values are written as ``NaN`` / ``Infinity`` (Python's ``json`` reads them back). The first
    line is the header ``{"distclip": {"config": ..., "groups": [...]}}`` (no ``step`` key).
    """

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self.path = Path(path)
        self.append = append
        self._file: Any = None

    def _open(self) -> Any:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
            self.append = True  # reopened after close(): continue the file
        return self._file

    def start(self, info: Mapping[str, Any]) -> None:
        self._line({HEADER_KEY: dict(info)})

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self._line({"step": step, **metrics})

    def write_details(self, metrics: Mapping[str, float], details: Mapping[str, Any], step: int) -> None:
        """One line: the metrics, then ``nonfinite_params`` / ``nonfinite_ranks`` / ``nonfinite_where``."""
        self._line({"step": step, **metrics, **details})

    def _line(self, record: Mapping[str, Any]) -> None:
        file = self._open()
        file.write(json.dumps(record, default=str) + "\n")
        file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink(BaseSink):
    """Scalars into a TensorBoard log folder (``torch.utils.tensorboard``; needs the ``tensorboard`` extra).

    The writer (and its event file) is created at the first write; the config goes in as text.
    """

    def __init__(self, log_dir: str | os.PathLike, **writer_kwargs: Any):
        require_extra("tensorboard", "tensorboard", "TensorBoard logging (log.tensorboard, TensorBoardSink)")
        self.log_dir = os.fspath(log_dir)
        self.writer_kwargs = writer_kwargs
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            module = require_extra("torch.utils.tensorboard", "tensorboard", "TensorBoard logging")
            self._writer = module.SummaryWriter(log_dir=self.log_dir, **self.writer_kwargs)
        return self._writer

    def start(self, info: Mapping[str, Any]) -> None:
        self._open().add_text("distclip/config", "```\n" + json.dumps(dict(info), indent=1, default=str) + "\n```")

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self._open()
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def write_details(self, metrics: Mapping[str, float], details: Mapping[str, Any], step: int) -> None:
        self.write(metrics, step)
        self._open().add_text("distclip/nonfinite", "```\n" + json.dumps(dict(details), indent=1) + "\n```", step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CallbackSink(BaseSink):
    """Hands each write to ``fn(metrics, step)`` (e.g. ``accelerator.log``, ``wandb.log``)."""

    def __init__(self, fn: Callable[..., Any], step_keyword: str = "step"):
        self.fn = fn
        self.step_keyword = step_keyword

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        self.fn(dict(metrics), **{self.step_keyword: step})


@dataclass
class _Entry:
    sink: Any
    every: int
    writes: bool
    started: bool = field(default=False)


class MetricsLog:
    """The sinks of one clipper: who writes, how often, and the one host read per due write.

    Args:
        group: the clipper's reduce group; ``rank`` in :meth:`add` is a rank of this group (None:
            the default group).
        every: the default interval, in clips.
        info: what :meth:`BaseSink.start` receives (the config and groups), or a callable making it.
    """

    def __init__(self, group: Any = None, every: int = 1,
                 info: Mapping[str, Any] | Callable[[], Mapping] | None = None):
        self.group = group
        self.every = every
        self._info = info
        self.entries: list[_Entry] = []
        self._finalizer = weakref.finalize(self, _close_all, self.entries)  # at exit too: TensorBoard flushes

    @classmethod
    def from_config(cls, spec: "LogSpec | None", group: Any = None, info: Any = None) -> "MetricsLog":
        log = cls(group, every=spec.every if spec is not None else 1, info=info)
        if spec is not None and spec.jsonl is not None:
            log.add(JSONLSink(spec.jsonl))
        if spec is not None and spec.tensorboard is not None:
            log.add(TensorBoardSink(spec.tensorboard))
        return log

    def add(self, sink: Any, every: int | None = None, rank: int | None = 0) -> Any:
        """Add ``sink``, written every ``every`` clips (default: the log's) by rank ``rank`` of the reduce
        group (None: by every rank). Returns the sink."""
        if not callable(getattr(sink, "write", None)) or not callable(getattr(sink, "close", None)):
            raise UsageError(
                f"a distclip sink needs write(metrics, step) and close() methods (e.g. distclip.JSONLSink(path)); "
                f"got {type(sink).__module__}.{type(sink).__qualname__}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise UsageError(f"add_sink(every=...) must be a whole number of clips >= 1, got {every!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise UsageError(
                f"add_sink(rank=...) must be a rank >= 0 of the clipper's reduce group, or None; got {rank!r}")
        self.entries.append(_Entry(sink, every or self.every, rank is None or rank_in_group(self.group) == rank))
        return sink

    def due(self, step: int, bad: bool = False) -> list[_Entry]:
        """The sinks this rank writes at clip ``step`` (all of them for an attributed ``bad`` step)."""
        return [e for e in self.entries if e.writes and (bad or step % e.every == 0)]

    def observe(self, report: "ClipReport", step: int) -> None:
        """Write ``report`` to the sinks due at clip ``step`` (reads the device only if one is due)."""
        if not self.entries:
            return
        details = report.details()
        due = self.due(step, bad=bool(details))
        if not due:
            return
        metrics = report.to_metrics()
        for entry in due:
            if not entry.started:
                entry.started = True
                start = getattr(entry.sink, "start", None)
                if callable(start):
                    start(self.info())
            write_details = getattr(entry.sink, "write_details", None)
            if details and callable(write_details):
                write_details(metrics, details, step)
            else:
                entry.sink.write(metrics, step)

    def info(self) -> dict[str, Any]:
        info = self._info() if callable(self._info) else self._info
        return dict(info or {})

    def close(self) -> None:
        """Close every sink (idempotent); a sink written again afterwards reopens (a JSONL file is continued)."""
        _close_all(self.entries)


def _close_all(entries: list[_Entry]) -> None:
    for entry in entries:
        entry.sink.close()


def rank_in_group(group: Any) -> int:
    """This process's rank in ``group`` (0 without torch.distributed; -1 when not a member)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank() if group is None else dist.get_rank(group)

