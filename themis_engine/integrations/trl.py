"""TRL reward functions: one callable per criterion, all served by one forward pass per batch.

    funcs = scorer.as_trl_reward_funcs()                       # or reward_funcs(scorer, ...)
    trainer = GRPOTrainer(model=..., reward_funcs=funcs, reward_weights=[1, 0.5, ...], ...)

TRL calls each reward function in turn as `f(prompts=..., completions=..., completion_ids=...,
**dataset_columns)` and logs it under `f.__name__` (here the criterion's name). The functions share
a small cache keyed by the batch's content, so the first call scores every criterion and the others
read their column: K criteria cost one forward pass, not K.

Inputs: plain text (prompt str = the user turn, completion str = the assistant answer) or
conversational (prompt = list of messages, completion = [{"role": "assistant", "content": ...}]).
Consecutive equal prompts (GRPO's num_generations samples of one prompt) form one group, whose
prompt is computed once. A completion of several messages (tool calls) is scored as the whole
conversation prompt + completion, without prefix sharing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from themis_engine.errors import InputError
from themis_engine.integrations import criterion_index, score_prompt_runs

if TYPE_CHECKING:  # the scorer imports this adapter (Scorer.as_trl_reward_funcs): no import back
    from themis_engine.scoring.scorer import Scorer

__all__ = ["reward_funcs", "BatchCache"]


class BatchCache:
    """The last `size` batches' scores [N, H], keyed by the batch's content; thread-safe.

    `forward_batches` counts the batches actually scored (cache misses), `lookups` every call."""

    def __init__(self, compute: Callable[[Sequence, Sequence], torch.Tensor], size: int = 2):
        if size < 1:
            raise ValueError(f"cache size must be at least 1, got {size}")
        self._compute = compute
        self._size = size
        self._entries: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.forward_batches = 0
        self.lookups = 0

    def scores(self, prompts: Sequence, completions: Sequence) -> torch.Tensor:
        key = _batch_key(prompts, completions)
        with self._lock:  # a second caller of the same batch waits for the first, then hits
            self.lookups += 1
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
            value = self._compute(prompts, completions)
            self.forward_batches += 1
            self._entries[key] = value
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def reward_funcs(
    scorer: Scorer,
    criteria: Sequence[int | str] | None = None,
    system: str | None = None,
    cache_size: int = 2,
) -> list[Callable[..., list[float]]]:
    """One TRL reward function per criterion (all of the model's, or `criteria` by name or index, in
    that order). system: a system message for every prompt that has none of its own.

    Each function: (prompts, completions, **kwargs) -> list[float], one reward per completion;
    unknown keyword arguments (dataset columns, completion_ids, trainer_state) are ignored. A
    sequence the scorer skips (on_overflow="skip") gets NaN, which TRL treats as "no reward".
    The functions share `fn.cache` (a BatchCache)."""
    names = scorer.criteria
    columns = [criterion_index(names, c) for c in (range(len(names)) if criteria is None else criteria)]
    if not columns:
        raise ValueError("criteria: at least one criterion is needed")
    cache = BatchCache(lambda p, c: _score_batch(scorer, p, c, system), size=cache_size)
    return [_criterion_func(names[j], j, cache) for j in columns]


def _criterion_func(name: str, column: int, cache: BatchCache) -> Callable[..., list[float]]:
    def reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        return cache.scores(prompts, completions)[:, column].tolist()

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"TRL reward function: the {name!r} score of each completion (themis_engine)."
    reward.cache = cache
    reward.criterion = name
    return reward


def _score_batch(scorer: Scorer, prompts: Sequence, completions: Sequence, system: str | None) -> torch.Tensor:
    """The whole batch, every criterion: float32 [N, H]."""
    if prompts is None or completions is None:
        raise InputError("TRL reward function: both prompts and completions are needed")
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise InputError(f"TRL reward function: {len(prompts)} prompts but {len(completions)} completions")
    texts = [_single_answer(c, i) for i, c in enumerate(completions)]
    if all(t is not None for t in texts):
        return score_prompt_runs(scorer, prompts, texts, system=system)
    # some completion holds several messages: score whole conversations (no prefix sharing)
    conversations = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        head = [{"role": "user", "content": p}] if isinstance(p, str) else [dict(m) for m in p]
        if system is not None and not (head and head[0].get("role") == "system"):
            head = [{"role": "system", "content": system}] + head
        tail = [{"role": "assistant", "content": c}] if isinstance(c, str) else [dict(m) for m in c]
        conversations.append(head + tail)
    return scorer.score(conversations)


def _single_answer(completion, i: int) -> str | None:
    """A completion's answer text; None for a conversational completion of several messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and all(isinstance(m, dict) for m in completion):
        if completion[-1].get("role") != "assistant":
            raise InputError(f"completion {i}: the last message must be the assistant's answer")
        if len(completion) == 1:
            content = completion[0].get("content")
            if not isinstance(content, str):
                raise InputError(f"completion {i}: the assistant message needs a string 'content'")
            return content
        return None
    raise InputError(
        f"completion {i}: expected a string or a list of messages, got {type(completion).__name__}"
    )


def _batch_key(prompts: Sequence, completions: Sequence):
    return (_freeze(prompts), _freeze(completions))


def _freeze(x):
    """A hashable copy of nested str / list / dict data (the batch's content)."""
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return ("list",) + tuple(_freeze(v) for v in x)
    return ("repr", type(x).__name__, repr(x))
