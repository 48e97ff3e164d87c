"""The HTTP side of the reward server: RewardServer (the Starlette app, its lifecycle and routes),
parse_request (the /get_reward body), load_scorer and the CLI's main. The protocol is described in
the package's docstring (themis_engine.serve)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from themis_engine.config import USER_ERRORS, one_line, parse_args, run_cli
from themis_engine.errors import InputError
from themis_engine.model.folder import check_model_folder
from themis_engine.scoring.scorer import Scorer
from themis_engine.serve.batcher import BatchStats, DynamicBatcher, RewardService
from themis_engine.serve.config import ServeConfig
from themis_engine.serve.encoder import QueryEncoder, RequestError, Sample

logger = logging.getLogger("themis_engine.serve")

__all__ = ["BatchStats", "DynamicBatcher", "QueryEncoder", "RequestError", "RewardServer", "RewardService",
           "Sample", "ServeConfig", "load_scorer", "main", "parse_request"]


# ------------------------------------------------------------------------------------ HTTP
def parse_request(body: bytes, max_chars: int | None = None) -> tuple[list[str], list[str] | None]:
    """The /get_reward body -> (query, prompts or None); RequestError(400) names what is wrong, and
    a query or prompt longer than `max_chars` characters is a RequestError(413)."""
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
    query = _str_list(data["query"], "query", max_chars)
    prompts = data.get("prompts")
    if prompts is not None:
        prompts = _str_list(prompts, "prompts", max_chars)
        if len(prompts) != len(query):
            raise RequestError(400, f"'prompts' has {len(prompts)} items for {len(query)} queries")
    labels = data.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise RequestError(400, f"'labels' must be a list or null, got {type(labels).__name__}")
    return query, prompts


# JSON's \uD800-\uDFFF escapes that do not form a pair decode to lone surrogates: not Unicode text
_SURROGATE = re.compile("[\ud800-\udfff]")


def _str_list(value: Any, name: str, max_chars: int | None = None) -> list[str]:
    if not isinstance(value, list):
        raise RequestError(400, f"'{name}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise RequestError(400, f"'{name}' is an empty list")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise RequestError(400, f"'{name}'[{i}] must be a string, got {type(v).__name__}")
        if max_chars is not None and len(v) > max_chars:
            raise RequestError(413, f"'{name}'[{i}] is {len(v)} characters, over the server's limit of {max_chars} "
                                    "per text (--max_query_chars)")
        bad = _SURROGATE.search(v)
        if bad is not None:
            raise RequestError(400, f"'{name}'[{i}]: character {bad.start()} is a lone UTF-16 surrogate "
                                    f"(U+{ord(bad.group()):04X}), not Unicode text; send UTF-8 text or paired "
                                    "\\uD8xx\\uDCxx escapes")
    return value


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]  # JSON has no NaN


class RewardServer:
    """The ASGI app (`.app`) and its state. Give a loaded `scorer`, or a `loader` that builds one;
    a loader runs in the model thread after startup, and /health answers 503 until it is done.
    The server scores with that one Scorer, at its max_length and token budget (RewardService)."""

    def __init__(self, cfg: ServeConfig, scorer: Scorer | None = None, loader: Callable[[], Scorer] | None = None):
        if (scorer is None) == (loader is None):
            raise ValueError("give exactly one of scorer and loader")
        self.cfg = cfg
        self._scorer, self._loader = scorer, loader
        self.service: RewardService | None = None
        self.error: str | None = None
        self.user_error = False  # the load failed on a user error (ThemisError, OSError): exit status 2
        self.non_finite_scores = 0  # queries answered with a null (NaN / inf) score in some criterion
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
            self.error = f"{type(err).__name__}: {one_line(err)}"
            self.user_error = isinstance(err, USER_ERRORS)
            if self.user_error:  # a model folder that cannot be served: one line naming the file
                logger.error("loading the reward model failed: %s", self.error)
            else:  # a bug: its traceback
                logger.error("loading the reward model failed: %s", self.error, exc_info=err)
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
            "max_length": s.max_length,
            "max_tokens_per_batch": s.budget,
            "truncated": s.encoder.truncated,
            "prompt_mismatch": s.encoder.prompt_mismatch,
            "non_finite_scores": self.non_finite_scores,
            "stats": vars(s.stats),
        })

    async def _get_reward(self, request):
        from starlette.responses import JSONResponse

        try:
            if self.service is None:
                why = f": {self.error}" if self.error else " yet"
                raise RequestError(503, "the reward model is not loaded" + why)
            body = await _read_body(request, self.cfg.max_request_bytes)
            query, prompts = parse_request(body, self.cfg.query_char_limit)
            loop = asyncio.get_running_loop()
            samples = await loop.run_in_executor(self._token_thread, self.service.encoder.samples, query, prompts)
            scores = await self.batcher.submit(samples)  # [n, H]
        except ClientGone as gone:  # nobody to answer: one line in the log, no traceback
            logger.warning("client %s disconnected %s", _client(request), gone)
            from starlette.responses import Response

            return Response(status_code=499)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except InputError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except Exception as err:  # noqa: BLE001 -- the server keeps serving
            logger.exception("scoring failed")
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)
        s = self.service
        rewards = _finite(scores[:, s.head].tolist())
        bad = int((~torch.isfinite(scores)).any(dim=1).sum())
        if bad:  # JSON has no NaN: null, counted on /health and logged
            self.non_finite_scores += bad
            logger.warning("%d of %d queries got a non-finite score (sent as null); %d so far", bad, len(rewards),
                           self.non_finite_scores)
        return JSONResponse({
            "rewards": rewards,
            "scores": rewards,
            "extra_logs": {name: _finite(scores[:, j].tolist()) for j, name in enumerate(s.criteria)},
        })


class ClientGone(Exception):
    """The client disconnected before the request was read whole; the message says how far it got."""


def _client(request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "(unknown)"


async def _read_body(request, limit: int) -> bytes:
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise RequestError(413, f"the body is {size} bytes, over the server's limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the server's limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        of = f" of {declared}" if declared is not None else ""
        raise ClientGone(f"after sending {size}{of} bytes of a {request.url.path} body; request dropped") from None
    return b"".join(chunks)


# ------------------------------------------------------------------------------------ CLI
def load_scorer(cfg: ServeConfig, tokenizer=None) -> Scorer:
    """The server's one Scorer, with the config's max_length and token budget (cfg.token_budget).
    tokenizer: the one check_model_folder returned (checked again where None: the folder must hold
    usable tokenizer files and a chat template, or cfg.chat_template give one)."""
    if tokenizer is None:
        tokenizer = check_model_folder(cfg.model, chat_template=cfg.chat_template)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    return Scorer.from_pretrained(
        cfg.model, device=cfg.device, dtype=dtype, max_length=cfg.max_length,
        max_tokens_per_batch=cfg.token_budget, tokenizer=tokenizer,
    )


def _description() -> str:
    import themis_engine.serve as package

    return (package.__doc__ or "").split("\n\n")[0]


def main(argv: list[str] | None = None) -> int:
    """`python -m themis_engine.serve MODEL ...`: 0 after a clean shutdown; 2 with one line on stderr
    on a bad option or a model folder that cannot be served (checked before the server starts:
    config.json, the safetensors headers, the tokenizer files and chat template), or when loading
    the weights fails on a user error (NaN weights, a damaged file); 1 when loading failed on
    anything else (its traceback in the log)."""
    return run_cli("themis_engine.serve", _main, argv)


def _main(argv: list[str]) -> int:
    cfg = parse_args(ServeConfig, argv, prog="python -m themis_engine.serve", description=_description())
    cfg.check()
    tokenizer = check_model_folder(cfg.model, chat_template=cfg.chat_template)  # never a ready server on a bad one
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = RewardServer(cfg, loader=lambda: load_scorer(cfg, tokenizer))
    uv = uvicorn.Server(uvicorn.Config(server.app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                       lifespan="on"))
    server.on_load_failed = lambda: setattr(uv, "should_exit", True)
    uv.run()
    if server.error:
        if server.user_error:
            print(f"themis_engine.serve: error: {server.error}", file=sys.stderr, flush=True)
            return 2
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
