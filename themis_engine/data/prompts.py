"""Criteria and their system prompts (the project's own texts; a user's map can replace them), and
the system message each training pair gets (`assign_system_prompts`).

A reward model trained with criteria prompts (the Themis recipe) sees, as the system message,
either nothing, a prompt listing all criteria, or the prompt of the pair's own criterion. The same
texts are used at evaluation (`--use-system-prompts`, `--use-aspect-prompts`). Users who hold the
exact prompts a published model was trained with pass them as a JSON/YAML map
{criterion name: prompt text, optional "ALL": text}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from themis_engine.data.schemas import PreferencePair

SYSTEM_PROMPT_MODES = ("scalar", "criteria")
DEFAULT_PROPORTIONS = (0.15, 0.20, 0.65)  # none / all criteria / the pair's own criterion
ALL_KEY = "ALL"

CRITERION_PROMPTS: dict[str, str] = {
    "Functional_Correctness": (
        "You are a code reviewer. Judge the response by functional correctness: does the code do what "
        "the task asks, for every valid input and edge case, without crashing or returning wrong results?"
    ),
    "Runtime_Efficiency": (
        "You are a code reviewer. Judge the response by runtime efficiency: does the code use algorithms "
        "and data structures whose time complexity fits the task, without needless repeated work?"
    ),
    "Memory_Efficiency": (
        "You are a code reviewer. Judge the response by memory efficiency: does the code avoid needless "
        "copies, unbounded buffers and leaks, and keep its memory use proportional to the task?"
    ),
    "Readability_Maintainability": (
        "You are a code reviewer. Judge the response by readability and maintainability: clear names, "
        "simple structure, no dead or duplicated code, easy for another engineer to change safely."
    ),
    "Security_Hardness": (
        "You are a code reviewer. Judge the response by security: does the code validate untrusted "
        "input and avoid injection, unsafe deserialization, overflows and leaking secrets?"
    ),
}

ALL_CRITERIA_PROMPT = (
    "You are a code reviewer. Judge the response on five criteria: functional correctness, runtime "
    "efficiency, memory efficiency, readability and maintainability, and security."
)


class CriteriaPrompts:
    """criterion name -> system prompt, plus the prompt listing all criteria."""

    def __init__(self, per_criterion: dict[str, str] | None = None, all_criteria: str | None = None):
        self.per_criterion = dict(CRITERION_PROMPTS if per_criterion is None else per_criterion)
        self.all_criteria = ALL_CRITERIA_PROMPT if all_criteria is None else all_criteria

    @classmethod
    def from_file(cls, path: str | Path) -> "CriteriaPrompts":
        """A JSON or YAML map {criterion: text}; the key "ALL" (optional) is the all-criteria prompt."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"criteria prompts file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{path}: expected a non-empty map of criterion name -> prompt text")
        bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"{path}: the prompt of {', '.join(map(str, bad))} is not a non-empty string")
        data = {str(k): v for k, v in data.items()}
        all_text = data.pop(ALL_KEY, None)
        return cls(data, all_text)

    def for_criterion(self, name: str) -> str:
        if name not in self.per_criterion:
            raise KeyError(
                f"no system prompt for criterion {name!r}; known: {', '.join(self.per_criterion)}"
            )
        return self.per_criterion[name]

    @property
    def criteria(self) -> list[str]:
        return list(self.per_criterion)


# ============================================================================================ per-pair system messages
PROMPT_NONE, PROMPT_ALL, PROMPT_OWN = "none", "all", "own"


def draw_prompt_kinds(
    pairs: Sequence[PreferencePair], proportions: Sequence[float] = DEFAULT_PROPORTIONS, seed: int = 0
) -> list[str]:
    """Per pair, which criteria prompt it gets: PROMPT_NONE / PROMPT_ALL / PROMPT_OWN, drawn with
    `proportions` (none, all, own). Pair i's draw depends only on (seed, i). A pair without an
    aspect cannot get its own: it draws between none and all in their relative proportions."""
    p = [float(x) for x in proportions]
    if len(p) != 3 or any(x < 0 for x in p) or not math.isclose(sum(p), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"proportions must be three non-negative numbers (none, all, own) summing to 1, got {proportions}"
        )
    u = np.random.default_rng(seed).random(len(pairs))
    kinds = []
    for ui, pair in zip(u, pairs):
        if pair.aspect is None:
            base = p[0] + p[1]
            cut = p[0] / base if base > 0 else 1.0  # only "own" was asked for: give none
            kinds.append(PROMPT_NONE if ui < cut else PROMPT_ALL)
        else:
            kinds.append(PROMPT_NONE if ui < p[0] else PROMPT_ALL if ui < p[0] + p[1] else PROMPT_OWN)
    return kinds


def combine_system(criteria_prompt: str | None, data_system: str | None) -> str | None:
    """The one system message of a pair: the criteria prompt, a blank line, the data's system text."""
    if criteria_prompt and data_system:
        return f"{criteria_prompt}\n\n{data_system}"
    return criteria_prompt or data_system or None


def assign_system_prompts(
    pairs: Sequence[PreferencePair],
    mode: str,
    criteria: Sequence[str],
    prompts: CriteriaPrompts | None = None,
    proportions: Sequence[float] = DEFAULT_PROPORTIONS,
    seed: int = 0,
) -> list[str | None]:
    """The system message of each pair (None: no system message), to pass to tokenize_pairs.

    mode "scalar": a criteria prompt per pair at random (draw_prompt_kinds: seeded, deterministic),
    combined with the pair's own `system` by combine_system. mode "criteria": the pair's own
    `system` only. prompts: the criteria prompt texts (default: the project's CriteriaPrompts()).
    """
    if mode not in SYSTEM_PROMPT_MODES:
        raise ValueError(f"mode must be one of {SYSTEM_PROMPT_MODES}, got {mode!r}")
    if mode == "criteria":
        return [p.system for p in pairs]
    prompts = CriteriaPrompts() if prompts is None else prompts
    criteria = list(criteria)
    outside = sorted({p.aspect for p in pairs if p.aspect is not None and p.aspect not in criteria})
    if outside:
        raise ValueError(f"aspect(s) {', '.join(outside)} are not among the run's criteria {criteria}")
    used = sorted({p.aspect for p in pairs if p.aspect is not None})
    missing = [a for a in used if a not in prompts.per_criterion]
    if missing:
        raise ValueError(
            f"no criteria prompt for {', '.join(missing)}; the prompts cover {', '.join(prompts.criteria)}"
        )
    out = []
    for pair, kind in zip(pairs, draw_prompt_kinds(pairs, proportions, seed)):
        if kind == PROMPT_NONE:
            text = None
        else:
            text = prompts.all_criteria if kind == PROMPT_ALL else prompts.for_criterion(pair.aspect)
        out.append(combine_system(text, pair.system))
    return out
