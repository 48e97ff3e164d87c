"""Module paths of the flat layout (before the domain packages) that users may still import.

`import themis_engine.scorer` (and every name below) gives the module at its new home, the very same
module object, so `isinstance` checks and monkeypatching behave as before. Nothing here is imported
eagerly: an old path costs nothing until somebody imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old path -> new path (both under themis_engine)
OLD_PATHS = {
    "batching": "train.microbatch",
    "checkpointing": "train.checkpoint",
    "configs": "config",
    "criteria": "data.prompts",
    "cuda_ext": "kernels.cuda_ext",
    "demo": "scoring.demo",
    "evaluation": "eval",
    "evaluation.partial": "eval.partial",
    "evaluation.report": "eval.report",
    "evaluation.results": "eval.results",
    "evaluation.rows": "data.schemas",
    "flops": "model.flops",
    "loading": "model.hf_checkpoint",
    "memory": "scoring.budget",
    "metrics": "train.metrics",
    "objective": "train.objective",
    "quant": "model.fp8",
    "scorer": "scoring.scorer",
    "streaming": "model.offload",
    "synthetic": "data.synthetic",
    "tables": "data.tables",
    "templating": "chat",
    "tiny": "testing.tiny",
    "train_config": "train.config",
    "trainer": "train.trainer",
    "workload": "data.workload",
}
_PREFIX = __name__.rsplit(".", 1)[0] + "."

# `themis_engine.config` held ModelArgs and the family table before it became the config system
_OLD_CONFIG_NAMES = ("DEFAULT_CRITERIA", "FAMILIES", "Family", "HEAD_KINDS", "ModelArgs", "NAMED_SHAPES", "ROPE_TYPES",
                     "SUPPORTED_ARCHITECTURES", "criteria_from_config", "rope_inv_freq")


def old_config_attribute(name: str):
    """Module __getattr__ of themis_engine.config: the model-args names it used to hold."""
    if name in _OLD_CONFIG_NAMES:
        return getattr(importlib.import_module(_PREFIX + "model.args"), name)
    raise AttributeError(f"module {_PREFIX}config has no attribute {name!r}")


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass

    def get_code(self, fullname):  # `python -m themis_engine.<old path>` runs the new module's code
        return importlib.util.find_spec(self.target).loader.get_code(self.target)


class OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_PREFIX) or fullname[len(_PREFIX):] not in OLD_PATHS:
            return None
        new = _PREFIX + OLD_PATHS[fullname[len(_PREFIX):]]
        target_spec = importlib.util.find_spec(new)
        origin = target_spec.origin if target_spec else None  # `python -m` reads it as argv[0]
        return importlib.util.spec_from_loader(fullname, _Alias(new), origin=origin)


def install() -> None:
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldPathFinder())  # before the path finder: a stale folder cannot shadow an alias
