"""Every distclip exception derives from :class:`distclip.DistclipError` and is exported from ``distclip``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import distclip

# Integrations import their framework when imported; the modules that need an optional package not
# installed here are still scanned where they import (the dev extras install every one of them).
MODULES = sorted(m.name for m in pkgutil.walk_packages(distclip.__path__, "distclip.") if not m.name.endswith("__main__"))


def exception_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("distclip"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_the_scan_sees_the_exceptions() -> None:
    found = exception_classes()
    assert len(found) >= 15, sorted(found)  # a scan that finds nothing would pass the checks below


def test_every_exception_has_the_common_base_and_is_exported() -> None:
    problems = []
    for qualname, cls in sorted(exception_classes().items()):
        if not issubclass(cls, Warning) and not issubclass(cls, distclip.DistclipError):
            problems.append(f"{qualname} does not derive from distclip.DistclipError")
        if getattr(distclip, cls.__name__, None) is not cls or cls.__name__ not in distclip.__all__:
            problems.append(f"{qualname} is not exported as distclip.{cls.__name__}")
    assert not problems, problems


def test_errors_keep_the_builtin_type_callers_catch() -> None:
    assert issubclass(distclip.ConfigError, ValueError)
    assert issubclass(distclip.UsageError, TypeError)
    assert issubclass(distclip.MissingExtraError, ImportError)
    assert issubclass(distclip.UnsupportedLayoutError, NotImplementedError)
