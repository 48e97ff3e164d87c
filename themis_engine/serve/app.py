"""An HTTP reward server for OpenRLHF's remote reward model (`--remote_rm_url http://HOST:PORT/get_reward`).

    pip install "themis-engine[serve]"
    python -m themis_engine.serve path/to/rm --port 5000 [--head Functional_Correctness]

POST /get_reward   {"query": [str], "prompts": [str] (optional), "labels": [...] (optional, unused)}
               ->  {"rewards": [float], "scores": [float], "extra_logs": {criterion: [float]}}
GET  /health       200 {"status": "ready", "criteria": [...], ...} once the model is loaded, else 503

`rewards` and `scores` are the `head` criterion's scores; `extra_logs` holds every criterion's, one
value per query (OpenRLHF logs them). How the text becomes tokens (`--query_format`):

* templated (default): what OpenRLHF sends with --apply_chat_template: each query is the chat-
  templated prompt followed by the decoded response (possibly ending with EOS and pad tokens). Pad
  tokens at either end are dropped, and the response's end is made the RM template's end of an
  assistant turn (ChatML: a trailing "<|im_end|>" becomes "<|im_end|>\\n"), so the text scored is
  exactly what the RM's chat template renders for that conversation when the policy uses the same
  template family (Qwen policies with a Qwen3 RM). The text is tokenized as is; the score is read
  at its last token. `prompts`, when given, must be a prefix of each query (else a 400 naming the
  index); it groups the queries of one prompt so that the prompt is computed once.
* plain: raw prompts (OpenRLHF without --apply_chat_template): `prompts` is required, each query is
  split into prompt + response, and the pair is rendered by the RM's chat template as a user turn
  and an assistant turn (with `--system` as a system message if given), like Scorer.score.

Requests are gathered by a dynamic batcher: they queue up while the model is busy, and once it is
free it takes queued requests up to the token budget (`--max_tokens_per_batch`), waiting at most
`--max_batch_wait_ms` for more when the queue runs dry. Queries of one prompt (from any of the
batch's requests) share the prompt's prefix in the packed forward pass. Tokenization runs in one
thread, the model in another, the HTTP event loop in neither.

Sequences over `--max_length` are cut from the right with the template's closing tokens kept. The
server listens on loopback unless `--host` says otherwise; bodies over `--max_request_bytes` get a
413, malformed ones a 400 with a message, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch

from themis_engine.config import ConfigError, option, parse_args
from themis_engine.integrations import criterion_index
from themis_engine.scoring.scorer import InputError, Scorer

logger = logging.getLogger("themis_engine.serve")


@dataclass
class ServeConfig:
    """The OpenRLHF-compatible reward server."""

    model: str = option("", "reward model folder (HF *ForSequenceClassification safetensors + tokenizer)", positional=True)
    host: str = option("127.0.0.1", "address to listen on (loopback by default; 0.0.0.0 accepts remote clients)")
    port: int = option(5000, "TCP port")
    max_length: int = option(4096, "longest sequence (prompt + response, templated) in tokens; longer ones are cut")
    max_tokens_per_batch: Optional[int] = option(
        None, "token budget of one model call (default: max(16384, max_length)); at least max_length"
    )
    max_batch_wait_ms: float = option(5.0, "how long an idle model waits for more requests to batch")
    max_request_bytes: int = option(32 * 2**20, "largest request body accepted (bigger: 413)")
    head: str = option("0", "the criterion (name or index) whose score goes in 'rewards' and 'scores'")
    query_format: Literal["templated", "plain"] = option(
        "templated", "templated: queries are chat-templated text; plain: raw prompt + response (needs prompts)"
    )
    system: Optional[str] = option(None, "query_format=plain: a system message put before each prompt")
    device: Optional[str] = option(None, "cuda, cuda:1, cpu (default: cuda when available)")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(
        None, "weights' dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = option("info", "uvicorn's log level")

    @property
    def token_budget(self) -> int:
        return self.max_tokens_per_batch if self.max_tokens_per_batch is not None else max(16384, self.max_length)

    def check(self) -> None:
        if not self.model:
            raise ConfigError("MODEL (the reward model folder) is required")
        if self.max_length < 2:
            raise ConfigError(f"max_length: must be at least 2, got {self.max_length}")
        if self.token_budget < self.max_length:
            raise ConfigError(
                f"max_tokens_per_batch={self.token_budget} is below max_length={self.max_length}: a sequence "
                "of max_length tokens would not fit a batch"
            )
        if self.max_batch_wait_ms < 0:
            raise ConfigError(f"max_batch_wait_ms: must be >= 0, got {self.max_batch_wait_ms}")
        if self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes: must be positive, got {self.max_request_bytes}")


class RequestError(Exception):
    """A request the server refuses; `status` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------ text -> tokens
@dataclass
class Sample:
    """One query, tokenized: ids (the whole scored sequence) and the key of its prompt group."""

    ids: list[int]
    group_key: str | None  # queries with the same key share their prompt prefix; None: alone


class QueryEncoder:
    """Turns OpenRLHF queries (and prompts) into token ids the way Scorer renders conversations.
    Not thread-safe (the tokenizer's settings): the server calls it from one thread."""

    _SENTINEL = "\x00themis-sentinel\x00"

    def __init__(self, tokenizer, max_length: int, query_format: str = "templated", system: str | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.query_format = query_format
        self.system = system
        self.pad = tokenizer.pad_token or ""
        self.eos = tokenizer.eos_token or ""
        self.closing = self._assistant_closing()
        self.closing_ids = self.encode(self.closing) if self.closing else []
        self.truncated = 0

    def _assistant_closing(self) -> str:
        """What the chat template writes after an assistant message's content (ChatML: '<|im_end|>\\n')."""
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "u"}, {"role": "assistant", "content": self._SENTINEL}], tokenize=False
            )
            at = text.rfind(self._SENTINEL)
            if at >= 0:
                return text[at + len(self._SENTINEL):]
        except Exception as err:  # a template that cannot render this: fall back on EOS
            logger.warning("chat template did not render a probe conversation (%s); closing with EOS", err)
        return self.eos

    def encode(self, text: str) -> list[int]:
        # the text already holds any BOS/special tokens, as in Scorer
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def samples(self, query: list[str], prompts: list[str] | None) -> list[Sample]:
        if self.query_format == "plain" and prompts is None:
            raise RequestError(400, "query_format=plain needs 'prompts' (one per query) to split each query")
        out = []
        for i, q in enumerate(query):
            q = self._strip_pads(q)
            prompt = None
            if prompts is not None:
                prompt = self._strip_pads(prompts[i], right=False)
                if not q.startswith(prompt):
                    raise RequestError(400, f"query {i} does not start with its prompt (prompts[{i}])")
            head = prompt  # the text before the response, where known
            if self.query_format == "plain":
                response = q[len(prompt):]
                if self.eos and response.endswith(self.eos):
                    response = response[: -len(self.eos)]
                conv = [{"role": "system", "content": self.system}] if self.system is not None else []
                conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                text = self.tokenizer.apply_chat_template(conv, tokenize=False)
                at = text.rfind(response) if response else -1
                head = text[:at] if at >= 0 else None
            else:
                text = self._close(q)
            ids = self.encode(text)
            if not ids:
                raise RequestError(400, f"query {i}: no tokens to score")
            if len(ids) > self.max_length:
                ids = self._truncate(ids, head, i)
            out.append(Sample(ids, prompt))
        return out

    def _strip_pads(self, text: str, right: bool = True) -> str:
        if not self.pad:
            return text
        while text.startswith(self.pad):
            text = text[len(self.pad):]
        while right and text.endswith(self.pad):
            text = text[: -len(self.pad)]
        return text

    def _close(self, text: str) -> str:
        """End the text with exactly one assistant-turn closing."""
        if not self.closing or text.endswith(self.closing):
            return text
        if self.eos and self.closing.startswith(self.eos) and text.endswith(self.eos):
            return text + self.closing[len(self.eos):]
        return text + self.closing

    def _truncate(self, ids: list[int], head: str | None, i: int) -> list[int]:
        """Cut the response from the right, keeping the closing tokens (Scorer's 'truncate'); a
        prompt (`head`, the text before the response) that alone fills max_length is refused."""
        tail = self.closing_ids
        if not tail or len(ids) <= len(tail) or ids[-len(tail):] != tail:
            tail = []
        keep = self.max_length - len(tail)
        if head is not None:
            head_ids = self.encode(head)
            n = 0
            while n < min(len(head_ids), len(ids)) and head_ids[n] == ids[n]:
                n += 1
            if n + 1 > keep:
                raise RequestError(
                    400, f"query {i}: the prompt alone is {n} tokens, over the server's max_length={self.max_length}"
                )
        self.truncated += 1
        logger.warning("query %d: %d tokens, cut to max_length=%d", i, len(ids), self.max_length)
        return ids[:keep] + tail


# ------------------------------------------------------------------------------------ dynamic batching
@dataclass
class _Pending:
    samples: list[Sample]
    tokens: int
    future: asyncio.Future


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    samples: int = 0
    most_requests_in_a_batch: int = 0
    tokens_computed: int = 0
    tokens_standalone: int = 0


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
    """The scorer behind the server: runs batches of requests (in the model thread)."""

    def __init__(self, scorer: Scorer, cfg: ServeConfig):
        self.criteria = scorer.criteria
        self.head = criterion_index(self.criteria, cfg.head)
        self.budget = cfg.token_budget
        # the server's own view of the model: its length limit and budget, used by the model thread only
        self.scorer = Scorer(scorer.model, scorer.tokenizer, cfg.max_length, self.budget)
        self.encoder = QueryEncoder(scorer.tokenizer, cfg.max_length, cfg.query_format, cfg.system)
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
        scored = self.scorer.score_token_groups([[] for _ in groups], groups)
        out = [torch.empty(len(samples), len(self.criteria), dtype=torch.float32) for samples in requests]
        for r, k, g, j in place:
            out[r][k] = scored[g][j]
        st, report = self.stats, self.scorer.last_report
        st.batches += 1
        st.requests += len(requests)
        st.samples += len(place)
        st.most_requests_in_a_batch = max(st.most_requests_in_a_batch, len(requests))
        st.tokens_computed += report.tokens_computed
        st.tokens_standalone += report.tokens_standalone
        return out


# ------------------------------------------------------------------------------------ HTTP
def parse_request(body: bytes) -> tuple[list[str], list[str] | None]:
    """The /get_reward body -> (query, prompts or None); RequestError(400) names what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    if "query" not in data:
        raise RequestError(400, "missing field 'query' (a list of strings: prompt + response)")
    query = _str_list(data["query"], "query")
    prompts = data.get("prompts")
    if prompts is not None:
        prompts = _str_list(prompts, "prompts")
        if len(prompts) != len(query):
            raise RequestError(400, f"'prompts' has {len(prompts)} items for {len(query)} queries")
    labels = data.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise RequestError(400, f"'labels' must be a list or null, got {type(labels).__name__}")
    return query, prompts


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise RequestError(400, f"'{name}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise RequestError(400, f"'{name}' is an empty list")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise RequestError(400, f"'{name}'[{i}] must be a string, got {type(v).__name__}")
    return value


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]  # JSON has no NaN


class RewardServer:
    """The ASGI app (`.app`) and its state. Give a loaded `scorer`, or a `loader` that builds one;
    a loader runs in the model thread after startup, and /health answers 503 until it is done."""

    def __init__(self, cfg: ServeConfig, scorer: Scorer | None = None, loader: Callable[[], Scorer] | None = None):
        if (scorer is None) == (loader is None):
            raise ValueError("give exactly one of scorer and loader")
        self.cfg = cfg
        self._scorer, self._loader = scorer, loader
        self.service: RewardService | None = None
        self.error: str | None = None
        self.on_load_failed: Callable[[], None] | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="themis-model")
        self._token_thread = ThreadPoolExecutor(1, thread_name_prefix="themis-tokenize")
        self.batcher: DynamicBatcher | None = None
        self._load_task: asyncio.Future | None = None
        self.app = self._build_app()

    def _build_app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            await self._startup()
            try:
                yield
            finally:
                await self._shutdown()

        routes = [
            Route("/get_reward", self._get_reward, methods=["POST"]),
            Route("/health", self._health, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    # ---------------------------------------------------------------- lifecycle
    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        if self._scorer is not None:
            self._ready(self._scorer)
        else:
            self._load_task = loop.run_in_executor(self._model_thread, self._loader)
            self._load_task.add_done_callback(self._loaded)

    def _loaded(self, fut: asyncio.Future) -> None:
        try:
            self._ready(fut.result())
        except BaseException as err:  # noqa: BLE001 -- reported on /health, and the CLI exits
            self.error = f"{type(err).__name__}: {err}"
            logger.error("loading the reward model failed: %s", self.error)
            if self.on_load_failed is not None:
                self.on_load_failed()

    def _ready(self, scorer: Scorer) -> None:
        service = RewardService(scorer, self.cfg)
        self.batcher = DynamicBatcher(
            service.run_batch, service.budget, self.cfg.max_batch_wait_ms / 1000.0, self._model_thread
        )
        self.batcher.start()
        self.service = service
        logger.info("reward model ready: criteria %s, head %s", service.criteria, service.criteria[service.head])

    async def _shutdown(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._token_thread.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- routes
    async def _health(self, request):
        from starlette.responses import JSONResponse

        if self.service is None:
            status = {"status": "failed", "error": self.error} if self.error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        s = self.service
        return JSONResponse({
            "status": "ready",
            "model": self.cfg.model,
            "criteria": s.criteria,
            "head": s.criteria[s.head],
            "query_format": self.cfg.query_format,
            "max_length": self.cfg.max_length,
            "max_tokens_per_batch": s.budget,
            "truncated": s.encoder.truncated,
            "stats": vars(s.stats),
        })

    async def _get_reward(self, request):
        from starlette.responses import JSONResponse

        try:
            if self.service is None:
                raise RequestError(503, "the reward model is not loaded" + (f": {self.error}" if self.error else " yet"))
            body = await _read_body(request, self.cfg.max_request_bytes)
            query, prompts = parse_request(body)
            loop = asyncio.get_running_loop()
            samples = await loop.run_in_executor(self._token_thread, self.service.encoder.samples, query, prompts)
            scores = await self.batcher.submit(samples)  # [n, H]
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except InputError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except Exception as err:  # noqa: BLE001 -- the server keeps serving
            logger.exception("scoring failed")
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)
        s = self.service
        rewards = _finite(scores[:, s.head].tolist())
        return JSONResponse({
            "rewards": rewards,
            "scores": rewards,
            "extra_logs": {name: _finite(scores[:, j].tolist()) for j, name in enumerate(s.criteria)},
        })


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise RequestError(413, f"the body is {size} bytes, over the server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------ CLI
def load_scorer(cfg: ServeConfig) -> Scorer:
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    return Scorer.from_pretrained(
        cfg.model, device=cfg.device, dtype=dtype, max_length=cfg.max_length,
        max_tokens_per_batch=cfg.token_budget,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(ServeConfig, argv, prog="python -m themis_engine.serve", description=(__doc__ or "").split("\n\n")[0])
        cfg.check()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = RewardServer(cfg, loader=lambda: load_scorer(cfg))
    uv = uvicorn.Server(uvicorn.Config(server.app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                       lifespan="on"))
    server.on_load_failed = lambda: setattr(uv, "should_exit", True)
    uv.run()
    return 1 if server.error else 0


if __name__ == "__main__":
    sys.exit(main())
