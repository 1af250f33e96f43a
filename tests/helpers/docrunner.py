"""Run documentation code blocks, each in a process of its own, without paying torch's import per block.

``python -m tests.helpers.docrunner`` is a small fork server: it imports torch and distclip once
(about 2 s of CPU on the CI machine, which per block would be most of the doc test), then for every
request forks one child per rank. A child is a copy of that freshly started interpreter and of
nothing else: no earlier block has run in it, and it runs its block as ``__main__`` from a file in
an empty working directory of its own, as ``python example.py`` would (or, with ranks, as
``torchrun --nproc_per_node N example.py`` would: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and a free
``MASTER_PORT`` in its environment). Everything runs on CPU (``CUDA_VISIBLE_DEVICES`` is empty).

Protocol: one JSON request per line on stdin (``code``, ``filename``, ``ranks``, ``timeout``), one JSON
answer per line on stdout (``rc`` and ``output`` per rank, ``timed_out``, ``seconds``). A child that
outlives its timeout is killed with its whole process group (ranks it started included).
:class:`DocRunner` is the client the tests use.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import REPO

ENV = {
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",  # CPU only, as on the CI machine
    "DS_ACCELERATOR": "cpu",  # DeepSpeed: no accelerator probe
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
GRACE = 15.0  # seconds the other ranks get after one rank failed (they may wait in a collective)


# ------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(script: Path, workdir: Path, output: Path, rank: int, ranks: int, port: int) -> None:
    """In the forked child: become a fresh ``python example.py`` (or one torchrun rank) and run the block."""
    os.setsid()  # its own process group: a timeout kills what it started too
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.chdir(workdir)
    if ranks > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                           "LOCAL_WORLD_SIZE": str(ranks), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "docs"})
    sys.argv = [str(script)]
    sys.path[0] = str(workdir)
    code = 0
    try:
        import runpy

        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # as the interpreter does: an int is the status, anything else is printed
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report whatever the block raised
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run(request: dict[str, Any]) -> dict[str, Any]:
    ranks = int(request.get("ranks", 1))
    timeout = float(request.get("timeout", 120))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distclip-doc-") as tmp:
        root = Path(tmp)
        workdir = root / "work"
        workdir.mkdir()
        script = workdir / request.get("filename", "example.py")
        script.write_text(request["code"])
        outputs = [root / f"rank{r}.txt" for r in range(ranks)]
        port = _free_port()
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(ranks):
            pid = os.fork()
            if pid == 0:
                _child(script, workdir, outputs[rank], rank, ranks, port)
            pids.append(pid)
        rcs: dict[int, int] = {}
        timed_out = False
        deadline = start + timeout
        while len(rcs) < ranks:
            for i, pid in enumerate(pids):
                if i in rcs:
                    continue
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rcs[i] = os.waitstatus_to_exitcode(status)
                    if rcs[i] != 0:
                        deadline = min(deadline, time.monotonic() + GRACE)
            if len(rcs) < ranks and time.monotonic() > deadline:
                timed_out = not any(rc != 0 for rc in rcs.values())
                for i, pid in enumerate(pids):
                    if i not in rcs:
                        _kill(pid)
                        rcs[i] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                break
            time.sleep(0.02)
        for pid in pids:  # whatever a rank left running in its process group
            _kill(pid, quiet=True)
        return {"rc": [rcs[i] for i in range(ranks)], "output": [p.read_text(errors="replace") for p in outputs],
                "timed_out": timed_out, "seconds": round(time.monotonic() - start, 2)}


def _kill(pid: int, quiet: bool = False) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if not quiet:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


PRELOAD = ("torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor", "torch.nn.parallel",
           "distclip", "distclip.testing")  # the imports every block would otherwise pay for


def serve() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_run(json.loads(line))), flush=True)


# ------------------------------------------------------------------------------------------ client
@dataclass
class Result:
    rc: list[int]
    output: list[str]
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.rc)

    def explain(self) -> str:
        what = "timed out" if self.timed_out else f"exit status {self.rc}"
        parts = [f"{what} after {self.seconds:.1f} s"]
        for rank, text in enumerate(self.output):
            parts.append(f"--- rank {rank} (exit {self.rc[rank]}) ---\n{text[-6000:]}")
        return "\n".join(parts)


class DocRunner:
    """The fork server, started once; ``run(code, ranks, timeout)`` runs one block."""

    def __init__(self) -> None:
        env = {**os.environ, **ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.docrunner"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the doc runner stopped (exit status {self.proc.poll()})")
        return json.loads(line)

    def run(self, code: str, ranks: int = 1, timeout: float = 120, filename: str = "example.py") -> Result:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"code": code, "ranks": ranks, "timeout": timeout, "filename": filename}) + "\n")
        self.proc.stdin.flush()
        return Result(**self._answer())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve()
