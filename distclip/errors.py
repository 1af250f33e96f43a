"""Every exception distclip raises, under one base: ``except distclip.DistclipError`` catches them all.

Each also derives from the built-in error a caller would expect (a bad config is a ``ValueError``,
a wrong argument type a ``TypeError``), and every message names what was wrong and how to fix it.
This module imports nothing from distclip: every layer may raise these.
"""

from __future__ import annotations

__all__ = [
    "BadStepError",
    "ClipAuditError",
    "ClipLogError",
    "ConfigError",
    "ConfigMismatchError",
    "DistclipError",
    "LaunchError",
    "MissingExtraError",
    "NonFiniteGradientError",
    "PartialGradientError",
    "RankFailed",
    "RanksTimedOut",
    "SpikeStreakError",
    "StaleClippingWarning",
    "StateDictError",
    "SuggestError",
    "UnsupportedDeepSpeedSetup",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "UsageError",
]


class DistclipError(Exception):
    """Base of every distclip exception."""


class ConfigError(DistclipError, ValueError):
    """A clip configuration (YAML, dict, keyword) that distclip refuses; the message names the key and the fix."""


class ConfigMismatchError(ConfigError):
    """Ranks disagree on the clip configuration or group layout (raised on every rank)."""


class StateDictError(ConfigError):
    """A state dict that does not belong to this clipper (another version, group layout or policy kind)."""


class UsageError(DistclipError, TypeError):
    """An argument of the wrong kind (e.g. ``attach("x")``): the message says what was expected."""


class UnsupportedModelError(DistclipError, TypeError):
    """distclip does not know how this object's gradients are laid out."""


class UnsupportedLayoutError(DistclipError, NotImplementedError):
    """A gradient layout distclip cannot count exactly; the message names the layout and what to do instead."""


class UnsupportedDeepSpeedSetup(UnsupportedLayoutError):
    """distclip does not (yet) know this DeepSpeed optimizer or parallel layout; the message says which."""


class PartialGradientError(DistclipError, ValueError):
    """A gradient still has a ``Partial`` placement: it must be reduced before it is clipped."""


class UnsupportedVersionError(DistclipError, RuntimeError):
    """A private internal of torch or of a framework that distclip reads is missing or changed."""


class BadStepError(DistclipError, RuntimeError):
    """A bad step distclip was told to stop at, raised on every rank at the same clip (the decision is taken
    on the reduced norms, identical everywhere).

    Attributes:
        streak: how many bad steps of this kind in a row, this one included (1 under ``nonfinite: error``).
        nonfinite_params: canonical names of the parameters holding a NaN or inf on some rank (empty when no
            element is non-finite: a norm that overflowed, or a spike).
        nonfinite_ranks: the ranks (global) holding them.
    """

    def __init__(self, message: str = "", *, streak: int = 0, nonfinite_params: tuple[str, ...] = (),
                 nonfinite_ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.streak = streak
        self.nonfinite_params = tuple(nonfinite_params)
        self.nonfinite_ranks = tuple(nonfinite_ranks)


class NonFiniteGradientError(BadStepError):
    """The global gradient norm is NaN or inf and ``nonfinite: error`` was asked for, or the last
    ``nonfinite.max_consecutive`` steps all were (raised on every rank)."""


class SpikeStreakError(BadStepError):
    """The last ``skip_spikes.max_consecutive`` steps were all skipped as spikes (raised on every rank)."""


class ClipAuditError(DistclipError, RuntimeError):
    """The clip audit found ranks that applied different coefficients (raised on every rank, naming them)."""


class MissingExtraError(DistclipError, ImportError):
    """A feature needs an optional package: the message names the ``distclip[...]`` extra to install."""


class LaunchError(DistclipError, ValueError):
    """``distclip launch`` would fail or silently run other than asked; the message says why and how to fix it."""


class SuggestError(DistclipError, ValueError):
    """``distclip suggest``: why no suggestion can be made from this log (the message says what to change)."""


class ClipLogError(DistclipError, ValueError):
    """A clip log that cannot be read: the message names the file (and line) and what was expected."""


class RankFailed(DistclipError, RuntimeError):
    """:func:`distclip.testing.run_ranks`: a rank raised or died; the message carries its traceback or exit code."""


class RanksTimedOut(DistclipError, RuntimeError):
    """:func:`distclip.testing.run_ranks`: ranks were still running at the deadline (a hang, or a far too slow test)."""


class StaleClippingWarning(UserWarning):
    """The audit saw a threshold that clips on (nearly) every step or on none for a long run."""
