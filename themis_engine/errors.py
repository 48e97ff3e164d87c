"""Every error type a user of themis_engine may catch, in one place.

Each message names what is wrong and where (the file, row, column, key, item or limit). The types
derive from ValueError (bad input or settings) or RuntimeError (a run that cannot go on), so code
written against those keeps working.

    ThemisError
    ├── InputError        scorer input: a conversation, a prompt, a group (names the item)
    ├── PackingError      a group over the token budget, an empty sequence
    ├── CheckpointError   a model folder that cannot be loaded or saved (names the tensors)
    ├── DataError         a data file or row (names the file, row and column)
    ├── ConfigError       a config file or override (names the key)
    ├── EvalError         an evaluation that cannot run as asked (names the row or option)
    ├── CompareError      a --compare directory without CRB results
    ├── ResumeError       evaluation partial files that cannot be resumed from
    ├── TrainingError     a training run that cannot go on (non-finite loss, bad set-up)
    └── MemoryBudgetError not even the smallest token budget fits in the GPU memory left
"""

from __future__ import annotations


class ThemisError(Exception):
    """Base of every error themis_engine raises on purpose."""


class InputError(ThemisError, ValueError):
    """Bad input to the scorer; the message names the item."""


class PackingError(ThemisError, ValueError):
    """A group that cannot be placed (over the token budget, or an empty sequence)."""


class CheckpointError(ThemisError, ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and with which tensors."""


class DataError(ThemisError, ValueError):
    """Bad input data; the message names the file, the row and, where it applies, the column."""


class ConfigError(ThemisError, ValueError):
    """A config file or override that does not fit the config; the message names the key."""


class EvalError(ThemisError, ValueError):
    """An evaluation that cannot run as asked; the message names the row or the option."""


class CompareError(ThemisError, ValueError):
    """A --compare directory without results, or with a results.json not in the CRB format."""


class ResumeError(ThemisError, RuntimeError):
    """The partial files cannot be resumed from (damaged, or written by a different run)."""


class TrainingError(ThemisError, RuntimeError):
    """The run cannot go on (non-finite loss or gradient, bad set-up); the message says where."""


class MemoryBudgetError(ThemisError, RuntimeError):
    """Not even the smallest budget fits in the memory left."""


__all__ = [
    "CheckpointError", "CompareError", "ConfigError", "DataError", "EvalError", "InputError",
    "MemoryBudgetError", "PackingError", "ResumeError", "ThemisError", "TrainingError",
]
