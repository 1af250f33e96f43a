"""What a user installs: the wheel and sdist built from this tree, the metadata, one version, the presets.

The wheel must hold everything distclip needs at run time (the presets, ``py.typed``, the LICENSE),
since a wheel user has no checkout; the sdist holds the package and its documents and, by choice,
no tests (the suite needs the whole repository: launch/, configs/). Both are built here, in a copy
of the tree, with the setuptools that is installed (torch 2.13 requires setuptools >= 77.0.3, the
first to write an SPDX ``License-Expression``), so the build needs no network.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch

import distclip
from distclip import ClipConfig, ConfigError, GradClipper, load_config
from tests.helpers import REPO

ROOT = REPO
PRESETS = ["autoclip", "demo", "demo_measure", "no_clip", "per_layer", "uniform", "zclip"]
JUNK = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "bench-results",
                              ".pytest_cache", ".hypothesis", "*.pyc")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel of this tree, built by setuptools' PEP 517 backend in a copy of it."""
    work = tmp_path_factory.mktemp("build")
    tree, out = work / "tree", work / "out"
    shutil.copytree(ROOT, tree, ignore=JUNK)
    out.mkdir()
    code = ("import sys, setuptools.build_meta as backend\n"
            "out = sys.argv[1]  # read once: the backend rewrites sys.argv\n"
            "sdist, wheel = backend.build_sdist(out), backend.build_wheel(out)\n"
            "print('BUILT', sdist, wheel)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdist, wheel = [line for line in proc.stdout.splitlines() if line.startswith("BUILT ")][-1].split()[1:]
    return {"sdist": out / sdist, "wheel": out / wheel}


def package_files() -> set[str]:
    """The package's source files in this tree (what both archives must ship)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "distclip").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml", ".typed")}


def test_the_wheel_holds_the_package_its_presets_py_typed_and_the_license(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = f"distclip-{distclip.__version__}.dist-info"
        metadata = email.message_from_bytes(wheel.read(f"{info}/METADATA"))
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        license_text = wheel.read(f"{info}/licenses/LICENSE")
    assert package_files() <= names, sorted(package_files() - names)
    assert {"distclip/py.typed", *(f"distclip/presets/{name}.yaml" for name in PRESETS)} <= names
    assert not [n for n in names if n.startswith(("tests/", "launch/", "configs/"))]
    assert license_text == (ROOT / "LICENSE").read_bytes() and b"Apache License" in license_text
    assert metadata["Name"] == "distclip" and metadata["Version"] == distclip.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and "License" not in metadata  # SPDX, not the old field
    assert metadata["Author"] == "distclip developers"
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.11" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # superseded by License-Expression
    assert "gradient clipping" in metadata["Keywords"]
    assert "distclip = distclip.cli:main" in entry_points


def test_the_sdist_holds_the_package_and_its_documents_and_no_tests(built):
    with tarfile.open(built["sdist"]) as sdist:
        prefix = f"distclip-{distclip.__version__}/"
        names = {m.name[len(prefix):] for m in sdist.getmembers() if m.isfile()}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "PKG-INFO"} <= names
    assert package_files() <= names, sorted(package_files() - names)
    assert not [n for n in names if n.startswith(("tests/", "launch/"))], "the sdist ships no tests (MANIFEST.in)"


def test_one_version_source():
    from distclip._version import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "distclip._version.__version__"}
    assert distclip.__version__ == __version__
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    requires = project["build-system"]["requires"]
    assert requires == ["setuptools>=77"]  # the first setuptools that writes License-Expression


def test_distclip_version_and_no_framework_import_for_env():
    """``python -m distclip --version``; ``distclip env`` imports no framework (it reads their metadata)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    version = subprocess.run([sys.executable, "-m", "distclip", "--version"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"distclip {distclip.__version__}", version
    report = subprocess.run([sys.executable, "-X", "importtime", "-m", "distclip", "env"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in report.stderr.splitlines() if line.startswith("import time:")}
    assert "torch.distributed" in imported  # importtime did list the imports
    frameworks = {"deepspeed", "accelerate", "transformers", "lightning", "torchtitan", "olmo_core", "torchft",
                  "mpi4py", "matplotlib", "tensorboard"}
    assert not frameworks & imported, frameworks & imported
    assert "torch " in report.stdout and "gloo yes" in report.stdout


# ------------------------------------------------------------------------------------------- presets
def test_presets_ship_in_the_package_and_configs_keeps_identical_copies():
    assert distclip.presets.names() == PRESETS
    for name in PRESETS:
        shipped = distclip.presets.path(name)
        assert shipped.parent == ROOT / "distclip" / "presets"
        # the README's commands use configs/<name>.yaml: the same bytes, never two diverging versions
        assert (ROOT / "configs" / f"{name}.yaml").read_bytes() == shipped.read_bytes(), name
        assert distclip.presets.load(name) == ClipConfig.from_yaml(shipped) == load_config(name)
    assert distclip.presets.load("demo", max_norm=0.5).max_norm == 0.5
    assert distclip.presets.load("no_clip").max_norm == float("inf")
    with pytest.raises(ConfigError, match=r"no distclip preset is named 'dmo' \(did you mean 'demo'\?\)\. Presets: "
                                          r"autoclip, demo, demo_measure"):
        distclip.presets.path("dmo")


def test_gradclipper_takes_a_preset_name():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "lstm": torch.nn.Linear(4, 4),
                                 "head": torch.nn.Linear(4, 3)})
    clipper = GradClipper(model, "demo")
    assert clipper.group_names == ["embed", "lstm", "default"]
    assert clipper.config == ClipConfig.from_yaml(ROOT / "configs" / "demo.yaml")


def test_string_resolution_order_file_then_preset_then_inline_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("uniform") == distclip.presets.load("uniform")  # no file named 'uniform' here: the preset
    Path("uniform").write_text("max_norm: 0.25\n")
    assert load_config("uniform").max_norm == 0.25  # an existing file comes first
    assert load_config("{max_norm: 0.75, norm_type: inf}").max_norm == 0.75  # inline YAML last
    assert load_config("distclip: {max_norm: 0.125}").max_norm == 0.125
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path("zclip"))  # an os.PathLike is always a file, never a preset name
    with pytest.raises(ConfigError, match=r"'zclp' is neither an existing file nor a distclip preset \(did you mean "
                                          r"'zclip'\?\)\. Presets: autoclip, demo"):
        load_config("zclp")
    with pytest.raises(ConfigError, match=r"'configs/demo.yaml' does not exist \(distclip ships this config as the "
                                          r"preset 'demo': pass 'demo' instead of the path\)"):
        load_config("configs/demo.yaml")  # the README's path, outside a checkout
    with pytest.raises(ConfigError, match=r"'\[1, 2\]' is neither an existing file nor an inline YAML mapping"):
        load_config("[1, 2]")


def test_environment_variable_takes_a_preset_name_too(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTCLIP_CONFIG", "zclip")
    assert ClipConfig.from_env() == distclip.presets.load("zclip") and ClipConfig.from_env().policy.kind == "zclip"
    monkeypatch.setenv("DISTCLIP_CONFIG", "autoclp")
    with pytest.raises(ConfigError, match=r"\$DISTCLIP_CONFIG='autoclp' is neither .*did you mean 'autoclip'"):
        ClipConfig.from_env()
    monkeypatch.setenv("DISTCLIP_CONFIG", "configs/zclip.yaml")
    with pytest.raises(ConfigError, match=r"is not an existing file \(distclip ships this config as the preset 'zclip'"):
        ClipConfig.from_env()
