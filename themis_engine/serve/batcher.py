"""The dynamic batcher and the scoring service behind it.

Requests queue up while the model is busy; once it is free, the batcher takes queued requests up to
the token budget (waiting at most max_wait_s for more when the queue runs dry) and the model thread
scores them in ONE packed call of the server's Scorer, queries of one prompt sharing its prefix.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from themis_engine.integrations import criterion_index
from themis_engine.scoring.budget import default_token_budget
from themis_engine.scoring.scorer import Scorer
from themis_engine.serve.config import ServeConfig, check_budget
from themis_engine.serve.encoder import QueryEncoder, Sample

logger = logging.getLogger("themis_engine.serve")


@dataclass
class _Pending:
    samples: list[Sample]
    tokens: int
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counts over the server's life (reported on /health)."""

    batches: int = 0
    requests: int = 0
    samples: int = 0
    most_requests_in_a_batch: int = 0
    tokens_computed: int = 0  # tokens in the packed streams (shared prefixes once)
    tokens_standalone: int = 0  # tokens if every query ran alone


class DynamicBatcher:
    """Gathers requests into token-budget batches for one model thread.

    submit() queues a request (its samples' token ids) and awaits its scores [n, H]. One task
    takes the first queued request, then more while they fit the budget (standalone tokens; a
    request alone over the budget is a batch by itself, split by the scorer), waiting at most
    max_wait_s for the next one when the queue is empty; the model thread scores the batch while
    newer requests queue up. A request that does not fit starts the next batch."""

    def __init__(self, run_batch: Callable[[list[list[Sample]]], list], budget: int, max_wait_s: float,
                 executor: ThreadPoolExecutor):
        self._run_batch = run_batch
        self.budget = budget
        self.max_wait_s = max_wait_s
        self._executor = executor
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="themis-batcher")
        self._task.add_done_callback(_report_death)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, samples: list[Sample]) -> torch.Tensor:
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(samples, sum(len(s.ids) for s in samples), fut))
        return await fut

    async def _next(self, deadline: float) -> _Pending | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), remaining)
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            batch, tokens = [first], first.tokens
            deadline = loop.time() + self.max_wait_s
            while tokens < self.budget:
                nxt = await self._next(deadline)
                if nxt is None:
                    break
                if tokens + nxt.tokens > self.budget:
                    carry = nxt
                    break
                batch.append(nxt)
                tokens += nxt.tokens
            live = [p for p in batch if not p.future.done()]  # a request whose client left is dropped
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.samples for p in live])
            except Exception as err:  # the model thread failed outside run_batch's own handling
                results = [err] * len(live)
            for p, res in zip(live, results):
                if p.future.done():
                    continue
                if isinstance(res, BaseException):
                    p.future.set_exception(res)
                else:
                    p.future.set_result(res)


def _report_death(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the batcher stopped: %r; requests will time out", task.exception())


class RewardService:
    """The scorer behind the server: encodes queries and runs batches of requests (in the model thread).

    Uses the one `scorer` the server loaded, its max_length and token budget included (load_scorer
    sets them from the config): the budget is scorer.max_tokens_per_batch, or where that is None
    the default rule (scoring.budget.default_token_budget) for max_length. Each call's counts come
    from the report that call returns, so nothing is read from shared per-call state.
    """

    def __init__(self, scorer: Scorer, cfg: ServeConfig):
        self.scorer = scorer
        self.criteria = scorer.criteria
        self.head = criterion_index(self.criteria, cfg.head)
        self.max_length = scorer.max_length
        given = scorer.max_tokens_per_batch
        self.budget = int(given) if given is not None else default_token_budget(self.max_length)
        check_budget(self.budget, self.max_length)
        if cfg.max_length != self.max_length:
            logger.warning("the server scores with its scorer's max_length=%d (the config says %d)",
                           self.max_length, cfg.max_length)
        self.encoder = QueryEncoder(scorer.tokenizer, self.max_length, cfg.query_format, cfg.system)
        self.stats = BatchStats()

    def run_batch(self, requests: list[list[Sample]]) -> list[torch.Tensor | Exception]:
        """Score several requests in one packed call; if that fails, each alone, so one bad request
        cannot fail the others. -> per request: float32 [n, H] or the exception."""
        try:
            return self._score_together(requests)
        except Exception as err:
            if len(requests) == 1:
                return [err]
            out: list[torch.Tensor | Exception] = []
            for r in requests:
                try:
                    out.extend(self._score_together([r]))
                except Exception as one:
                    out.append(one)
            return out

    def _score_together(self, requests: list[list[Sample]]) -> list[torch.Tensor]:
        groups: list[list[list[int]]] = []
        open_groups: dict[str, tuple[int, int]] = {}  # prompt key -> (group, its standalone tokens)
        place = []  # (request, sample, group, position in group)
        for r, samples in enumerate(requests):
            for k, s in enumerate(samples):
                g, used = open_groups.get(s.group_key, (None, 0)) if s.group_key is not None else (None, 0)
                if g is None or used + len(s.ids) > self.budget:
                    g, used = len(groups), 0
                    groups.append([])
                groups[g].append(s.ids)
                place.append((r, k, g, len(groups[g]) - 1))
                if s.group_key is not None:
                    open_groups[s.group_key] = (g, used + len(s.ids))
        # the common token prefix of each group is found by the scorer (empty given prefixes)
        scored, report = self.scorer.score_token_groups([[] for _ in groups], groups, return_report=True)
        out = [torch.empty(len(samples), len(self.criteria), dtype=torch.float32) for samples in requests]
        for r, k, g, j in place:
            out[r][k] = scored[g][j]
        st = self.stats
        st.batches += 1
        st.requests += len(requests)
        st.samples += len(place)
        st.most_requests_in_a_batch = max(st.most_requests_in_a_batch, len(requests))
        st.tokens_computed += report.tokens_computed
        st.tokens_standalone += report.tokens_standalone
        return out
