"""Every exception kpistream raises, in one module (:class:`KpistreamError` and its subclasses),
and :class:`Rejection`, a bad row of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass


class KpistreamError(Exception):
    """Base class of every kpistream error.

    The tree::

        KpistreamError                 base of everything below
        ├── ConfigError                a config file or option is wrong (names the key path)
        ├── EventError                 one wire event is bad (names the field and the reason)
        │                              never raised out of a batch: bad rows are returned
        │                              as ``Rejection`` records and counted
        ├── StateError                 two metric states cannot be merged (different specs)
        ├── InputError                 a file given to the CLI cannot be read
        └── RegistryError              the model registry / tracking store failed (``code`` says how)
            ├── RegistryNotFound       the model, version, alias, run or experiment does not exist
            └── RegistryConflict       it exists already (created meanwhile by someone else)

    Bad input inside a batch is never an exception that escapes: the batch
    validators return the good rows and a list of ``Rejection`` (row index,
    field, reason) so one bad row cannot sink a batch or crash a shard.
    """


class ConfigError(KpistreamError):
    """A configuration value is missing, unknown or invalid.

    ``path`` is the dotted key path (``windows[1].size``) and ``reason`` says
    what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class EventError(KpistreamError):
    """One event failed validation: ``field`` and ``reason`` say why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class StateError(KpistreamError):
    """Two metric states were merged that do not describe the same thing."""


class InputError(KpistreamError):
    """An input file could not be read or decoded."""


class RegistryError(KpistreamError):
    """The model registry or tracking store (MLflow) refused or failed an operation.

    ``code`` is the store's error code (``RESOURCE_DOES_NOT_EXIST``,
    ``INVALID_PARAMETER_VALUE`` ...) or None when it gave none.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)


class RegistryNotFound(RegistryError):
    """What was asked for (registered model, version, alias, run, experiment) does not exist."""


class RegistryConflict(RegistryError):
    """What was to be created exists already."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that was refused, with the reason, returned instead of raised.

    ``index`` is the row's position in the batch it came in, ``field`` the
    offending field (dotted for nested fields, ``""`` for the whole row) and
    ``reason`` a short code (``missing``, ``wrong_type``, ``not_finite``,
    ``negative``, ``too_long``, ``future``, ``late``, ``duplicate`` ...)
    followed by a human sentence in ``message``.
    """

    index: int
    field: str
    reason: str
    message: str = ""

    def as_dict(self) -> dict:
        return {"index": self.index, "field": self.field, "reason": self.reason,
                "message": self.message}
