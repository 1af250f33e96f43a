"""``distclip env``: what a bug report needs to know about this installation, in one paste.

distclip's version and location; Python and the platform; the installed version of each package
distclip works with next to the range its tests ran (from distclip's own requirements); which
``torch.distributed`` backends this torch has (gloo, NCCL, MPI, UCC) and whether CUDA is usable.

Versions are read from the installed packages' metadata (``importlib.metadata``): nothing but torch
is imported, so the report is quick and works when a framework is broken. A version is checked
against its range by release numbers (local labels such as ``+cpu`` and pre-release tags ignored).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

# What the report lists, in this order: distribution name as pip knows it.
PACKAGES = ("torch", "pydantic", "pyyaml", "deepspeed", "accelerate", "transformers", "lightning", "torchtitan",
            "ai2-olmo-core", "torchft", "mpi4py", "numpy", "matplotlib", "tensorboard", "triton")
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()]*)\)?\s*(?:;(.*))?$")
_EXTRA = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")
_OPERATOR = re.compile(r"\s*(~=|==|!=|<=|>=|<|>)\s*(\S+)\s*$")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distclip env", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ------------------------------------------------------------------ collecting
def collect() -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints)."""
    from .._version import __version__

    tested = tested_ranges()
    packages = []
    for name in PACKAGES:
        version = installed_version(name)
        spec, extra = tested.get(_normal(name), ("", None))
        packages.append({"name": name, "installed": version, "tested": spec, "extra": extra,
                         "within": None if version is None or not spec else within(version, spec)})
    return {
        "distclip": {"version": __version__, "location": str(Path(__file__).resolve().parent.parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable, "requires": tested.get("python", ("", None))[0]},
        "platform": {"system": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "packages": packages,
        "torch": torch_backends(),
        "mpirun": shutil.which("mpirun") or shutil.which("mpiexec"),
    }


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tested_ranges() -> dict[str, tuple[str, str | None]]:
    """Normalised package name -> (version specifier, the distclip extra that installs it), and 'python'.

    From the pyproject.toml beside the package in a source checkout (the truth for this code), else
    from the installed distribution's metadata. A package named by several extras keeps its first
    range outside ``dev`` (the test-only extra).
    """
    requirements, python = _requirements()
    ranges: dict[str, tuple[str, str | None]] = {"python": (python, None)}
    for text, extra in requirements:
        match = _REQUIREMENT.match(text)
        if not match:
            continue
        name = _normal(match.group(1))
        clauses = [c for c in match.group(2).replace(" ", "").split(",") if c]
        spec = ",".join(sorted(clauses, key=lambda c: not c.startswith(">")))  # lower bound first, as pyproject
        if name not in ranges or (ranges[name][1] == "dev" and extra != "dev"):
            ranges[name] = (spec, extra)
    return ranges


def _requirements() -> tuple[list[tuple[str, str | None]], str]:
    """(requirement, extra or None) pairs and Requires-Python."""
    pyproject = Path(__file__).resolve().parent.parent.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10: read the installed metadata instead
            tomllib = None
        if tomllib is not None:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
            if project.get("name") == "distclip":
                pairs: list[tuple[str, str | None]] = [(r, None) for r in project.get("dependencies", [])]
                for extra, items in project.get("optional-dependencies", {}).items():
                    pairs += [(r, extra) for r in items]
                return pairs, project.get("requires-python", "")
    try:
        dist = metadata.distribution("distclip")
    except metadata.PackageNotFoundError:
        return [], ""
    pairs = []
    for text in dist.requires or []:
        marker = _EXTRA.search(text.partition(";")[2])
        pairs.append((text, marker.group(1) if marker else None))
    return pairs, dist.metadata["Requires-Python"] or ""


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def within(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies every clause of ``spec`` (e.g. ``>=2.13,<2.14``), on release numbers."""
    mine = _release(version)
    for clause in filter(None, spec.split(",")):
        match = _OPERATOR.match(clause)
        if not match:
            continue
        operator, text = match.groups()
        if text.endswith(".*"):  # ==2.13.* / !=2.13.*: a prefix match
            prefix = _release(text[:-2])
            equal = mine[: len(prefix)] == prefix
            if (operator == "==") != equal:
                return False
            continue
        other = _release(text)
        width = max(len(mine), len(other))
        a, b = mine + (0,) * (width - len(mine)), other + (0,) * (width - len(other))
        ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b,
              "~=": a >= b and a[: len(other) - 1] == b[: len(other) - 1]}[operator]
        if not ok:
            return False
    return True


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def torch_backends() -> dict[str, Any]:
    """torch.distributed's backends and CUDA, as this torch build has them."""
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                            "distributed": False, "backends": {}}
    try:
        import torch.distributed as dist
    except ImportError:
        return info
    info["distributed"] = dist.is_available()
    if dist.is_available():
        for name in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            check = getattr(dist, f"is_{name}_available", None)
            if check is not None:
                info["backends"][name] = bool(check())
    cuda = torch.cuda.is_available()
    info["cuda_available"] = cuda
    if cuda:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if info["backends"].get("nccl"):
        try:
            info["nccl_version"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # a build that reports NCCL but cannot load it: say so, do not fail the report
            info["nccl_version"] = "unreadable"
    return info


# ------------------------------------------------------------------ formatting
def format_report(report: dict[str, Any]) -> str:
    d, py, pf, t = report["distclip"], report["python"], report["platform"], report["torch"]
    lines = [f"distclip  {d['version']}  ({d['location']})",
             f"python    {py['version']} ({py['implementation']}, {py['executable']})"
             + (f"; distclip requires {py['requires']}" if py["requires"] else ""),
             f"platform  {pf['system']} ({pf['machine']}, {pf['cpus']} CPUs)", "",
             f"{'package':<15} {'installed':<16} {'tested':<18} {'':<12} extra"]
    for row in report["packages"]:
        verdict = "" if row["within"] is None else ("ok" if row["within"] else "NOT TESTED")
        extra = f"distclip[{row['extra']}]" if row["extra"] else ("required" if row["tested"] else "")
        lines.append(f"{row['name']:<15} {row['installed'] or 'not installed':<16} {row['tested'] or '-':<18} "
                     f"{verdict:<12} {extra}".rstrip())
    lines.append("")
    if not t["distributed"]:
        lines.append("torch.distributed: not available in this torch build")
    else:
        backends = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in t["backends"].items())
        lines.append(f"torch.distributed backends: {backends}")
        if not t["backends"].get("mpi"):
            lines.append("  (no MPI backend, as in the torch wheels: under mpirun, distclip.mpi starts gloo/NCCL)")
    if t.get("cuda_available"):
        lines.append(f"CUDA: {len(t['gpus'])} GPUs ({', '.join(sorted(set(t['gpus'])))}), torch built with CUDA "
                     f"{t['cuda_build']}" + (f", NCCL {t['nccl_version']}" if "nccl_version" in t else ""))
    else:
        lines.append("CUDA: not available" + (f" (torch built with CUDA {t['cuda_build']})" if t["cuda_build"]
                                              else " (a CPU-only torch build)"))
    lines.append(f"mpirun: {report['mpirun'] or 'not on PATH'}")
    return "\n".join(lines)
