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

Pickling. TRL's async GRPO trainer (`trl.experimental.async_grpo`) scores in a child process made
with the "spawn" start method: it checks `pickle.dumps` of the reward functions (stdlib pickle, not
cloudpickle), sends them to the child, which has CUDA_VISIBLE_DEVICES="" and calls them from worker
threads (one per function, concurrently). So the functions are instances of `CriterionReward` (a
module-level class, not closures), and what they pickle is small:

* a scorer made by `Scorer.from_pretrained` pickles as its load recipe (`scorer.load_kwargs`, with
  its current max_length / max_tokens_per_batch / on_overflow), not its weights. The receiving
  process loads it on the first call, not while unpickling (TRL unpickles before it hides the GPUs),
  once per process and recipe however many times functions are unpickled there; a recipe naming a
  CUDA device loads on the CPU in a process that has none. The weights are read again from the
  recipe's path: a scorer whose weights were changed in memory after loading must not rely on this.
* any other scorer pickles whole, weights included, if its model is on the CPU; on a GPU that is a
  clear error (a CUDA-free child could not load it): load it with `Scorer.from_pretrained` instead.
* the functions of one `reward_funcs` call keep sharing one batch cache after unpickling, whether
  they are pickled together (TRL sends the list at once) or one by one: the cache carries an id, and
  one cache per id lives in each process.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from themis_engine.errors import InputError
from themis_engine.integrations import criterion_index, score_prompt_runs

if TYPE_CHECKING:  # the scorer imports this adapter (Scorer.as_trl_reward_funcs): no import back
    from themis_engine.scoring.scorer import Scorer

__all__ = ["reward_funcs", "BatchCache", "CriterionReward"]

logger = logging.getLogger("themis_engine")

# the scorer settings a user may change after loading; a recipe carries their current values
_SETTINGS = ("max_length", "max_tokens_per_batch", "on_overflow")

# per process: scorers by (class, load recipe) and batch caches by id, alive while something uses them
_registry_lock = threading.Lock()
_scorers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_caches: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _forget_inherited_state() -> None:
    """In a forked child: the parent's scorers may hold CUDA memory that is unusable there."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _scorers.clear()
    _caches.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_state)


class BatchCache:
    """The last `size` batches' scores [N, H], keyed by the batch's content; thread-safe.

    `forward_batches` counts the batches actually scored (cache misses), `lookups` every call.
    Pickles as (id, compute, size) and unpickles to this process's cache of that id (made on first
    use, empty), so functions sharing a cache still share one after being sent elsewhere."""

    def __init__(self, compute: Callable[[Sequence, Sequence], torch.Tensor], size: int = 2):
        if size < 1:
            raise ValueError(f"cache size must be at least 1, got {size}")
        self._setup(compute, size, uuid.uuid4().hex)
        with _registry_lock:
            _caches[self._id] = self

    def _setup(self, compute, size: int, cache_id: str) -> None:
        self._compute = compute
        self._size = size
        self._id = cache_id
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

    def __reduce__(self):
        return _process_cache, (self._id, self._compute, self._size)


def _process_cache(cache_id: str, compute, size: int) -> BatchCache:
    """Unpickling a BatchCache: this process's cache of that id, made (empty) on first use."""
    with _registry_lock:
        cache = _caches.get(cache_id)
        if cache is None:
            cache = BatchCache.__new__(BatchCache)
            cache._setup(compute, size, cache_id)
            _caches[cache_id] = cache
        return cache


class CriterionReward:
    """A TRL reward function: the score of one criterion for each (prompt, completion) of a batch.

    Called as `f(prompts=..., completions=..., **kwargs) -> list[float]`; `__name__` and `criterion`
    are the criterion's name, `column` its index in the scorer's output, `cache` the BatchCache it
    shares with the other criteria. Picklable (see the module docstring)."""

    def __init__(self, name: str, column: int, cache: BatchCache):
        self.__name__ = self.__qualname__ = name
        self.__doc__ = f"TRL reward function: the {name!r} score of each completion (themis_engine)."
        self.criterion = name
        self.column = column
        self.cache = cache

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        return self.cache.scores(prompts, completions)[:, self.column].tolist()

    @property
    def scorer(self) -> Scorer:
        """The Scorer behind these functions (after unpickling: loaded from its recipe on first use)."""
        return self.cache._compute.scorer

    def __repr__(self) -> str:
        return f"CriterionReward({self.criterion!r}, column={self.column})"


def reward_funcs(
    scorer: Scorer,
    criteria: Sequence[int | str] | None = None,
    system: str | None = None,
    cache_size: int = 2,
) -> list[CriterionReward]:
    """One TRL reward function per criterion (all of the model's, or `criteria` by name or index, in
    that order). system: a system message for every prompt that has none of its own.

    Each function: (prompts, completions, **kwargs) -> list[float], one reward per completion;
    unknown keyword arguments (dataset columns, completion_ids, trainer_state) are ignored. A
    sequence the scorer skips (on_overflow="skip") gets NaN, which TRL treats as "no reward".
    The functions share `fn.cache` (a BatchCache) and can be pickled (module docstring)."""
    names = scorer.criteria
    columns = [criterion_index(names, c) for c in (range(len(names)) if criteria is None else criteria)]
    if not columns:
        raise ValueError("criteria: at least one criterion is needed")
    cache = BatchCache(_BatchScorer(scorer, system), size=cache_size)
    return [CriterionReward(names[j], j, cache) for j in columns]


class _BatchScorer:
    """Scores a whole batch, every criterion, with the scorer; pickles the scorer as its load recipe
    where it has one (loaded again on first use in the receiving process), else whole."""

    def __init__(self, scorer: Scorer, system: str | None):
        self.system = system
        self._scorer: Scorer | None = scorer
        self._load: tuple[type, dict] | None = None  # (scorer class, recipe) until loaded here
        self._lock = threading.Lock()

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            with self._lock:
                if self._scorer is None:
                    self._scorer = _process_scorer(*self._load)
        return self._scorer

    def __call__(self, prompts: Sequence, completions: Sequence) -> torch.Tensor:
        return _score_batch(self.scorer, prompts, completions, self.system)

    def __getstate__(self) -> dict:
        if self._scorer is None:  # unpickled here and never used: pass the recipe on
            return {"system": self.system, "load": self._load}
        recipe = _recipe(self._scorer)
        if recipe is not None:
            cls = type(self._scorer)
            _remember(cls, recipe, self._scorer)  # unpickled in this process: the same scorer
            return {"system": self.system, "load": (cls, recipe)}
        device = getattr(self._scorer.model, "device", None)
        if device is not None and torch.device(device).type != "cpu":
            raise TypeError(
                f"these TRL reward functions cannot be pickled: their Scorer was not made by Scorer.from_pretrained "
                f"(no load_kwargs), so it would be pickled whole, and its model is on {device}, which a process "
                "without that device (TRL's async GRPO rollout worker hides the GPUs) cannot load. Load the scorer "
                "with themis_engine.Scorer.from_pretrained(path, ...): its reward functions then pickle as that "
                "recipe and load the model again where they are used."
            )
        return {"system": self.system, "scorer": self._scorer}

    def __setstate__(self, state: dict) -> None:
        self.system = state["system"]
        self._scorer = state.get("scorer")
        self._load = state.get("load")
        self._lock = threading.Lock()


def _recipe(scorer: Scorer) -> dict | None:
    """The Scorer.from_pretrained arguments that load this scorer again (with its current settings),
    or None for a scorer made otherwise."""
    load = getattr(scorer, "load_kwargs", None)
    if not load:
        return None
    recipe = dict(load)
    if recipe.get("path") is not None and os.path.isdir(os.fspath(recipe["path"])):
        recipe["path"] = os.path.abspath(os.fspath(recipe["path"]))
    for name in _SETTINGS:
        if hasattr(scorer, name):
            recipe[name] = getattr(scorer, name)
    return recipe


def _recipe_key(cls: type, recipe: dict):
    def hashable(v):
        try:
            hash(v)
            return v
        except TypeError:  # e.g. a tokenizer object: the same object only
            return ("id", id(v))

    return cls, tuple(sorted((k, hashable(v)) for k, v in recipe.items()))


def _remember(cls: type, recipe: dict, scorer: Scorer) -> None:
    with _registry_lock:
        _store(_recipe_key(cls, recipe), scorer)


def _store(key, scorer: Scorer) -> None:
    """Record this process's scorer for a recipe (the caller holds _registry_lock)."""
    try:
        _scorers.setdefault(key, scorer)
    except TypeError:  # not weak-referenceable: unpickled here, it is loaded again
        pass


def _process_scorer(cls: type, recipe: dict) -> Scorer:
    """This process's scorer for (cls, recipe), loaded with cls.from_pretrained on first use."""
    key = _recipe_key(cls, recipe)
    with _registry_lock:  # held while loading: concurrent first calls load once
        scorer = _scorers.get(key)
        if scorer is None:
            kwargs = dict(recipe)
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
                logger.warning("TRL reward functions: the scorer was loaded on %s, this process has no CUDA device; "
                               "loading it on the CPU", device)
                kwargs["device"] = "cpu"
                if kwargs.get("offload") is not None:
                    kwargs["offload"] = None  # the weights are in host memory already
            scorer = cls.from_pretrained(**kwargs)
            _store(key, scorer)
        return scorer


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
