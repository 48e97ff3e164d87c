"""verl: reward functions for verl's reward loop (verl >= 0.9), per sample, batched across concurrent calls.

How verl 0.9 calls a custom reward function (verl/experimental/reward_loop/, reward_manager/naive.py):
it loads `reward.custom_reward_function.name` from `reward.custom_reward_function.path` and calls it
ONCE PER SAMPLE, with keywords only,

    compute_score(data_source=..., solution_str=<decoded response>, ground_truth=..., extra_info=<dict>,
                  **reward.custom_reward_function.reward_kwargs)

from an asyncio task per sample: an `async def` function is awaited on verl's event loop (all the
samples a worker holds are in flight at once); a plain function runs in the loop's default thread
pool (at most min(32, CPUs + 4) samples in flight per worker). It expects a float, or a dict whose
"score" is the reward (verl logs the other keys; every sample must return the same keys).
verl 0.9 has no batch reward manager in that loop any more (`reward_model.reward_manager=batch` and
the top-level `custom_reward_function.*` keys are not read by main_ppo).

A reward model needs the prompt, which verl does not pass: put it in each row's `extra_info` when you
build the dataset (`extra_info["prompt"] = <the user text or the message list>`). ground_truth and
data_source are not used.

So that per-sample calls still share forward passes, the per-sample form goes through a small
batching queue (a dynamic batcher): the first request waits up to `batch_wait_ms` for others (or
until about `batch_tokens` tokens are queued), then ONE scoring call scores everything queued,
equal prompts grouped (even when not consecutive) so that the K samples of one prompt share the
prompt's forward pass; each caller gets its own row back, and an error of that call reaches every
caller of the batch. Requests that arrive while a batch is being scored form the next batch.

The same functions also take verl's older batch signature (`data_sources=, solution_strs=,
ground_truths=, extra_infos=` -> one result per response), scored at once in the calling thread.
Which form a call is: the keyword names (`solution_str` or `solution_strs`); a positional call by the
type of the second argument (a str: one sample; a list or array: a batch).

Two ways to plug it in:

    # this module, configured from verl's config (pkg:// imports the installed package):
    #   reward.custom_reward_function.path=pkg://themis_engine.integrations.verl
    #   reward.custom_reward_function.name=compute_score_async      (or compute_score)
    #   +reward.custom_reward_function.reward_kwargs.model_path=path/to/rm

    # or your own file, named in reward.custom_reward_function.path:
    from themis_engine import Scorer
    from themis_engine.integrations.verl import make_compute_score
    compute_score = make_compute_score(Scorer.from_pretrained("path/to/rm"), return_dict=True)
    compute_score_async = compute_score.as_async          # the same queue, for name=compute_score_async

verl may import this file by path (a fresh module object per load), so it uses absolute imports only,
defines no dataclasses, and keeps its per-process model cache in the package module (one model per
process and set of reward_kwargs, however verl loaded the file).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

from themis_engine.errors import InputError
from themis_engine.integrations import criterion_index, score_prompt_runs

if TYPE_CHECKING:  # the adapters take a Scorer; they import it for typing only (see integrations/__init__)
    import torch

    from themis_engine.scoring.scorer import Scorer

__all__ = ["make_compute_score", "compute_score", "compute_score_async", "score_grouped", "BatchQueue"]

DEFAULT_WAIT_MS = 5.0
DEFAULT_BATCH_TOKENS = 65536
CHARS_PER_TOKEN = 4  # the queue's token estimate (before the chat template); the scorer counts exactly


# ------------------------------------------------------------------------------ prompts and grouping
def _prompt_of(info: Any, key: str, where: str):
    """info[key] as a str or a list of message dicts (verl hands parquet list columns over as numpy
    arrays). where: how errors name the item ("extra_infos[3]", "extra_info")."""
    if not hasattr(info, "get") or info.get(key) is None:
        have = f"its keys are {sorted(map(str, info))}" if hasattr(info, "keys") else f"it is {type(info).__name__}"
        raise InputError(
            f"verl compute_score: {where} has no prompt under {key!r} ({have}); put the prompt in "
            f"the dataset's extra_info[{key!r}] (verl passes extra_info, not the prompt, to reward functions)"
        )
    prompt = info[key]
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "__len__") and len(prompt) and all(hasattr(m, "keys") for m in prompt):
        messages = [dict(m) for m in prompt]
        for j, m in enumerate(messages):  # checked here, so that a bad prompt fails its own call, not a batch
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"verl compute_score: {where}[{key!r}][{j}] needs a 'role' and a 'content' string")
        return messages
    raise InputError(
        f"verl compute_score: {where}[{key!r}] must be a string or a non-empty list of chat messages, "
        f"got {type(prompt).__name__}"
    )


def _prompt_key(prompt) -> tuple:
    """A hashable key, equal for equal prompts (a str, or a message list compared by content)."""
    if isinstance(prompt, str):
        return ("text", prompt)
    return ("messages", json.dumps(prompt, sort_keys=True, default=str))


def _approx_tokens(prompt) -> int:
    text_len = len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content", ""))) for m in prompt)
    return text_len // CHARS_PER_TOKEN + 1


def score_grouped(scorer: Scorer, prompts: Sequence[Any], responses: Sequence[str], system=None) -> torch.Tensor:
    """Score (prompt_i, response_i) in one call with EQUAL prompts grouped wherever they are (each
    distinct prompt is computed once); float32 [N, H], rows in input order."""
    import torch

    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
    group_of: dict[tuple, int] = {}
    members: list[list[int]] = []
    for i, p in enumerate(prompts):
        g = group_of.setdefault(_prompt_key(p), len(members))
        if g == len(members):
            members.append([])
        members[g].append(i)
    order = [i for group in members for i in group]
    scores = score_prompt_runs(scorer, [prompts[i] for i in order], [responses[i] for i in order], system=system)
    out = torch.empty_like(scores)
    out[torch.as_tensor(order, dtype=torch.long)] = scores
    return out


# ------------------------------------------------------------------------------ the batching queue
_SCORER_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Scorer -> Lock: one call at a time
_SCORER_LOCKS_GUARD = threading.Lock()


def _scorer_lock(scorer) -> threading.Lock:
    with _SCORER_LOCKS_GUARD:
        lock = _SCORER_LOCKS.get(scorer)
        if lock is None:
            lock = _SCORER_LOCKS[scorer] = threading.Lock()
        return lock


class _Request:
    __slots__ = ("prompt", "response", "key", "prompt_tokens", "tokens", "future", "t")

    def __init__(self, prompt, response: str):
        self.prompt, self.response = prompt, response
        self.key = _prompt_key(prompt)
        self.prompt_tokens = _approx_tokens(prompt)
        self.tokens = len(response) // CHARS_PER_TOKEN + 1
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.t = time.monotonic()


class BatchQueue:
    """Gathers concurrent (prompt, response) requests into shared scoring calls.

    submit() queues a request and returns a concurrent.futures.Future of its [H] score row. A worker
    thread (started on demand, gone after `idle_s` without requests) waits until the oldest queued
    request is `max_wait_s` old or about `max_batch_tokens` tokens are queued (characters / 4, each
    distinct prompt once), takes requests in arrival order up to that budget (at least one), and
    scores them with one score_grouped call under the scorer's lock. Thread-safe; usable from threads
    (`future.result()`) and from asyncio (`asyncio.wrap_future`); a cancelled request is dropped
    before it is scored."""

    def __init__(self, scorer: Scorer, system: str | None = None, max_wait_s: float = DEFAULT_WAIT_MS / 1e3,
                 max_batch_tokens: int = DEFAULT_BATCH_TOKENS, idle_s: float = 2.0):
        if max_wait_s < 0 or max_batch_tokens < 1:
            raise ValueError(f"need max_wait_s >= 0 and max_batch_tokens >= 1, got {max_wait_s}, {max_batch_tokens}")
        self.scorer, self.system = scorer, system
        self.max_wait_s, self.max_batch_tokens, self.idle_s = float(max_wait_s), int(max_batch_tokens), float(idle_s)
        self.requests = self.batches = self.largest_batch = 0  # counters, for tests and benchmarks
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Request] = []
        self._queued_keys: dict[tuple, int] = {}  # prompt key -> queued requests with it
        self._queued_tokens = 0  # estimate: every queued response, plus each distinct queued prompt once
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch}

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
        """Score a whole batch now, in the calling thread (the batch form): float32 [N, H]."""
        with _scorer_lock(self.scorer):
            return score_grouped(self.scorer, prompts, responses, system=self.system)

    def submit(self, prompt, response: str) -> concurrent.futures.Future:
        if not isinstance(response, str):
            raise InputError(f"verl compute_score: solution_str must be a string, got {type(response).__name__}")
        if self._pid != os.getpid():  # a forked child inherits no worker thread (and maybe a held lock)
            self._reset()
        req = _Request(prompt, response)
        with self._cond:
            self._queue.append(req)
            self.requests += 1
            n = self._queued_keys.get(req.key, 0)
            self._queued_keys[req.key] = n + 1
            self._queued_tokens += req.tokens + (0 if n else req.prompt_tokens)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="themis-verl-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req.future

    # ---------------------------------------------------------------- worker thread
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # a bug here must not leave callers waiting forever
            with self._cond:
                pending, self._queue = self._queue, []
                self._queued_keys, self._queued_tokens, self._thread = {}, 0, None
            for r in pending:
                if r.future.running() or r.future.set_running_or_notify_cancel():
                    r.future.set_exception(err)
            raise

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if not self._cond.wait(self.idle_s) and not self._queue:
                        self._thread = None  # the next submit() starts a new one
                        return
                deadline = self._queue[0].t + self.max_wait_s
                while self._queued_tokens < self.max_batch_tokens:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take()
            if batch:
                self._score_batch(batch)

    def _take(self) -> list[_Request]:
        """Queued requests in arrival order up to the token budget (at least one); cancelled ones dropped."""
        batch: list[_Request] = []
        seen: set[tuple] = set()
        tokens = taken = 0
        for req in self._queue:
            cost = req.tokens + (0 if req.key in seen else req.prompt_tokens)
            if batch and tokens + cost > self.max_batch_tokens:
                break
            taken += 1
            left = self._queued_keys[req.key] - 1
            self._queued_tokens -= req.tokens + (0 if left else req.prompt_tokens)
            if left:
                self._queued_keys[req.key] = left
            else:
                del self._queued_keys[req.key]
            if req.future.set_running_or_notify_cancel():  # False: its caller cancelled it
                batch.append(req)
                seen.add(req.key)
                tokens += cost
        del self._queue[:taken]
        return batch

    def _score_batch(self, batch: list[_Request]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            scores = self.score([r.prompt for r in batch], [r.response for r in batch])
        except BaseException as err:  # noqa: BLE001 - every caller of the batch gets the error
            for r in batch:
                r.future.set_exception(err)
            return
        for r, row in zip(batch, scores):
            r.future.set_result(row)


# ------------------------------------------------------------------------------ the reward functions
def _is_batch(solution_str, solution_strs) -> bool:
    """The call's form: keyword solution_strs -> a batch; solution_str a str -> one sample; any other
    value in the second position (a list or array) -> a positional batch call."""
    if solution_strs is not None:
        if solution_str is not None:
            raise InputError("verl compute_score: got both solution_str (one sample) and solution_strs (a batch)")
        return True
    if solution_str is None:
        raise InputError("verl compute_score: no solution_str (one sample) nor solution_strs (a batch) was given")
    return not isinstance(solution_str, str)


def _build(scorer: Scorer, prompt_key: str, head: int | str, return_dict: bool, system: str | None,
           batch_wait_ms: float, batch_tokens: int | None) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(sync function, async function), each taking both forms, sharing one BatchQueue."""
    criteria = list(scorer.criteria)
    column = criterion_index(criteria, head)
    if batch_tokens is None:
        batch_tokens = max(DEFAULT_BATCH_TOKENS, int(scorer.max_tokens_per_batch or 0))
    queue = BatchQueue(scorer, system=system, max_wait_s=float(batch_wait_ms) / 1e3, max_batch_tokens=int(batch_tokens))

    def result(row) -> float | dict:
        values = row.tolist()
        if not return_dict:
            return values[column]
        return {"score": values[column], **dict(zip(criteria, values))}

    def batch(solution_strs, extra_infos) -> list:
        responses = list(solution_strs)
        infos = [None] * len(responses) if extra_infos is None else list(extra_infos)
        if len(infos) != len(responses):
            raise InputError(f"verl compute_score: {len(responses)} solution_strs but {len(infos)} extra_infos")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise InputError(f"verl compute_score: solution_strs[{i}] must be a string, got {type(r).__name__}")
        prompts = [_prompt_of(info, prompt_key, f"extra_infos[{i}]") for i, info in enumerate(infos)]
        return [result(row) for row in queue.score(prompts, responses)]

    def submit(solution_str, extra_info) -> concurrent.futures.Future:
        return queue.submit(_prompt_of(extra_info, prompt_key, "extra_info"), solution_str)

    def compute_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, *,
                      data_sources=None, solution_strs=None, ground_truths=None, extra_infos=None, **kwargs):
        """verl reward function: one sample (-> float or dict) or a batch (-> list); see the module doc."""
        if _is_batch(solution_str, solution_strs):
            return batch(solution_str if solution_strs is None else solution_strs,
                         extra_info if extra_infos is None else extra_infos)
        return result(submit(solution_str, extra_info).result())

    async def compute_score_async(data_source=None, solution_str=None, ground_truth=None, extra_info=None, *,
                                  data_sources=None, solution_strs=None, ground_truths=None, extra_infos=None,
                                  **kwargs):
        """compute_score as a coroutine: verl awaits it on its event loop, which it never blocks."""
        if _is_batch(solution_str, solution_strs):
            return await asyncio.to_thread(batch, solution_str if solution_strs is None else solution_strs,
                                           extra_info if extra_infos is None else extra_infos)
        return result(await asyncio.wrap_future(submit(solution_str, extra_info)))

    for fn in (compute_score, compute_score_async):
        fn.criteria = list(criteria)
        fn.queue = queue
    compute_score.as_async = compute_score_async
    compute_score_async.as_sync = compute_score
    return compute_score, compute_score_async


def make_compute_score(
    scorer: Scorer,
    prompt_key: str = "prompt",
    head: int | str = 0,
    return_dict: bool = False,
    system: str | None = None,
    asynchronous: bool = False,
    batch_wait_ms: float = DEFAULT_WAIT_MS,
    batch_tokens: int | None = None,
) -> Callable[..., Any]:
    """A verl reward function backed by `scorer`, taking both call forms (see the module docstring).

    prompt_key: the key of extra_info that holds the prompt (a str = the user turn, or a list of chat
    messages). head: the criterion (name or index) whose score is the reward. return_dict: return
    {"score": reward, <criterion>: score, ...} instead of a float. system: a system message for every
    prompt that has none of its own. asynchronous: return the `async def` variant (verl awaits it);
    either function's other variant is its `.as_async` / `.as_sync`, on the same queue (`.queue`).
    batch_wait_ms / batch_tokens: how long the first queued sample waits for others, and about how
    many tokens one batch holds at most (default max(65536, the scorer's max_tokens_per_batch))."""
    sync_fn, async_fn = _build(scorer, prompt_key, head, return_dict, system, batch_wait_ms, batch_tokens)
    return async_fn if asynchronous else sync_fn


# ------------------------------------------------------------------------------ configured from verl
_LOADED: dict[tuple, tuple[Callable[..., Any], Callable[..., Any]]] = {}
_LOAD_LOCK = threading.Lock()

_LOAD_OPTIONS = dict(device=None, dtype=None, max_length=4096, max_tokens_per_batch=None, prompt_key="prompt",
                     head=0, return_dict=False, system=None, batch_wait_ms=DEFAULT_WAIT_MS, batch_tokens=None)


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """verl's call kwargs -> (our reward_kwargs, defaults filled in; the rest)."""
    options = {k: kwargs.pop(k, default) for k, default in _LOAD_OPTIONS.items()}
    return options, kwargs


def _key(model_path, o: dict) -> tuple:
    if model_path is None:
        raise InputError(
            "themis_engine.integrations.verl.compute_score needs model_path: set "
            "+reward.custom_reward_function.reward_kwargs.model_path=<reward model folder>"
        )
    return (str(model_path), o["device"], o["dtype"], int(o["max_length"]), o["max_tokens_per_batch"],
            o["prompt_key"], str(o["head"]), bool(o["return_dict"]), o["system"], float(o["batch_wait_ms"]),
            o["batch_tokens"])


def _loaded(model_path, o: dict) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The (sync, async) functions of the model at model_path: loaded once per process and options."""
    key = _key(model_path, o)
    with _LOAD_LOCK:
        fns = _LOADED.get(key)
        if fns is None:
            import torch

            from themis_engine.scoring.scorer import Scorer

            dtype = getattr(torch, o["dtype"]) if isinstance(o["dtype"], str) else o["dtype"]
            scorer = Scorer.from_pretrained(
                model_path, device=o["device"], dtype=dtype, max_length=int(o["max_length"]),
                max_tokens_per_batch=o["max_tokens_per_batch"],
            )
            fns = _LOADED[key] = _build(scorer, o["prompt_key"], o["head"], bool(o["return_dict"]), o["system"],
                                        float(o["batch_wait_ms"]), o["batch_tokens"])
    return fns


def compute_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, *,
                  data_sources=None, solution_strs=None, ground_truths=None, extra_infos=None,
                  model_path: str | None = None, **kwargs):
    """verl's reward function with the reward model named by `model_path` (in
    reward.custom_reward_function.reward_kwargs, with device, dtype, max_length, max_tokens_per_batch,
    prompt_key, head, return_dict, system, batch_wait_ms, batch_tokens); one sample or a batch (see the
    module docstring). The scorer is loaded on first use and kept per process."""
    options, rest = _split_kwargs(kwargs)
    sync_fn, _ = _LOADED.get(_key(model_path, options)) or _loaded(model_path, options)
    return sync_fn(data_source, solution_str, ground_truth, extra_info, data_sources=data_sources,
                   solution_strs=solution_strs, ground_truths=ground_truths, extra_infos=extra_infos, **rest)


async def compute_score_async(data_source=None, solution_str=None, ground_truth=None, extra_info=None, *,
                              data_sources=None, solution_strs=None, ground_truths=None, extra_infos=None,
                              model_path: str | None = None, **kwargs):
    """compute_score as a coroutine (name=compute_score_async): verl awaits all the samples of a worker
    at once, so they batch together; the first call loads the model in a thread, off verl's event loop."""
    options, rest = _split_kwargs(kwargs)
    _, async_fn = _LOADED.get(_key(model_path, options)) or await asyncio.to_thread(_loaded, model_path, options)
    return await async_fn(data_source, solution_str, ground_truth, extra_info, data_sources=data_sources,
                          solution_strs=solution_strs, ground_truths=ground_truths, extra_infos=extra_infos, **rest)


if __name__ != "themis_engine.integrations.verl":
    # verl's load_module runs a file given by path as a fresh module on every load: share the package
    # module's per-process state, so that each process loads a model (and runs its queue) once
    import themis_engine.integrations.verl as _package_module

    _LOADED, _LOAD_LOCK = _package_module._LOADED, _package_module._LOAD_LOCK
    _SCORER_LOCKS, _SCORER_LOCKS_GUARD = _package_module._SCORER_LOCKS, _package_module._SCORER_LOCKS_GUARD
