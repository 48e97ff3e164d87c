"""Adapters that plug a Scorer into RL trainers: TRL (`trl.py`), verl (`verl.py`); OpenRLHF talks to
the HTTP server of `themis_engine.serve`.

What the adapters share lives here: picking criteria by name or index, and scoring a batch whose
consecutive items repeat a prompt (GRPO / RLOO sample K responses per prompt and lay them out
next to each other) as prompt groups, so that each prompt is computed once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from themis_engine.errors import InputError

if TYPE_CHECKING:  # Scorer.as_trl_reward_funcs imports the TRL adapter, so the adapters import Scorer for typing only
    from themis_engine.scoring.scorer import Scorer

__all__ = ["criterion_index", "prompt_runs", "score_prompt_runs"]


def criterion_index(criteria: Sequence[str], which: int | str) -> int:
    """A criterion given by name or by index (an int, or a str of digits) -> its column index."""
    if isinstance(which, str) and which.strip().lstrip("-").isdigit():
        which = int(which)
    if isinstance(which, bool):
        raise ValueError(f"criterion must be a name or an index, got {which!r}")
    if isinstance(which, int):
        if not -len(criteria) <= which < len(criteria):
            raise ValueError(f"criterion index {which} is out of range for {len(criteria)} criteria {list(criteria)}")
        return which % len(criteria)
    if which not in criteria:
        raise ValueError(f"unknown criterion {which!r}; this model has {', '.join(criteria)}")
    return list(criteria).index(which)


def prompt_runs(prompts: Sequence[Any]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive equal prompts (str or message lists)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append((start, i))
            start = i
    return runs


def score_prompt_runs(scorer: Scorer, prompts: Sequence[Any], responses: Sequence[str], system=None) -> torch.Tensor:
    """Score (prompt_i, response_i), i < N, as one call: consecutive equal prompts form one group
    (prompt computed once). prompts: str (a user turn) or message lists; system: None or a str put
    as the system message of every prompt that has none of its own. Returns float32 [N, H], rows in
    input order."""
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise InputError(f"item {i}: the response must be a string, got {type(r).__name__}")
    runs = prompt_runs(prompts)
    heads = [prompts[a] for a, _ in runs]
    systems = [None if _has_system(p) else system for p in heads]
    groups = scorer.score_groups(heads, [list(responses[a:b]) for a, b in runs], system=systems)
    if not groups:
        return torch.zeros(0, len(scorer.criteria), dtype=torch.float32)
    return torch.cat(groups)


def _has_system(prompt) -> bool:
    return (
        isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict)
        and prompt[0].get("role") == "system"
    )
