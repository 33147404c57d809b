"""Errors a user can act on. Each message is one line: what is wrong, and what to do."""

from __future__ import annotations


class VitportError(Exception):
    """Base of every error the CLI turns into one line and an exit code."""

    exit_code = 2


class SpecError(VitportError):
    """The model spec names nothing vitport can load."""


class UnsupportedModelError(VitportError):
    """The checkpoint is of a model type vitport has no adapter for."""


class HubUnreachableError(VitportError):
    """A hub (Hugging Face, ModelScope) could not be reached."""


class WeightsError(VitportError):
    """Weights are missing, unsafe, or do not fit the architecture."""


class ImageError(VitportError):
    """No usable image was given."""


class DeviceError(VitportError):
    """The requested device or dtype cannot be used here."""


class OutOfMemoryError(VitportError):
    """The device ran out of memory."""


class GoldenMismatchError(VitportError):
    """A golden Features file does not match the run it is compared with."""


class ClusterError(VitportError):
    """The cluster lost what the run needed, or made no progress: what was written stays."""

    exit_code = 1
