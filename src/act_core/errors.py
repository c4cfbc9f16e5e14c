"""Exceptions raised by act_core. Every message names the problem and what to do about it."""

from __future__ import annotations


class ACTError(Exception):
    """Base class for all ACT errors."""


class ACTInputError(ACTError, ValueError):
    """Bad user input: prompt sets, samples, strength, method or support names."""


class ACTMapFileError(ACTError, OSError):
    """A map file that cannot be read: missing, truncated, corrupted or not an ACT map."""


class ACTModelMismatchError(ACTError, ValueError):
    """A map that does not fit the model it is applied to (missing module or wrong width)."""


class ACTWarning(UserWarning):
    """Something that works but is probably not what was meant (e.g. a map that does nothing)."""
