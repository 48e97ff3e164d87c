"""Criteria and their system prompts (the project's own texts; a user's map can replace them).

A reward model trained with criteria prompts (the Themis recipe) sees, as the system message,
either nothing, a prompt listing all criteria, or the prompt of the pair's own criterion. The same
texts are used at evaluation (`--use-system-prompts`, `--use-aspect-prompts`). Users who hold the
exact prompts a published model was trained with pass them as a JSON/YAML map
{criterion name: prompt text, optional "ALL": text}.
"""

from __future__ import annotations

import json
from pathlib import Path

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
