"""The HTTP side of the reward server: RewardServer (the Starlette app, its lifecycle and routes),
parse_request (the /get_reward body), load_scorer and the CLI's main. The protocol is described in
the package's docstring (themis_engine.serve)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from themis_engine.config import parse_args
from themis_engine.errors import ConfigError, InputError
from themis_engine.scoring.scorer import Scorer
from themis_engine.serve.batcher import BatchStats, DynamicBatcher, RewardService
from themis_engine.serve.config import ServeConfig
from themis_engine.serve.encoder import QueryEncoder, RequestError, Sample

logger = logging.getLogger("themis_engine.serve")

__all__ = ["BatchStats", "DynamicBatcher", "QueryEncoder", "RequestError", "RewardServer", "RewardService",
           "Sample", "ServeConfig", "load_scorer", "main", "parse_request"]


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
    a loader runs in the model thread after startup, and /health answers 503 until it is done.
    The server scores with that one Scorer, at its max_length and token budget (RewardService)."""

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
            "max_length": s.max_length,
            "max_tokens_per_batch": s.budget,
            "truncated": s.encoder.truncated,
            "prompt_mismatch": s.encoder.prompt_mismatch,
            "stats": vars(s.stats),
        })

    async def _get_reward(self, request):
        from starlette.responses import JSONResponse

        try:
            if self.service is None:
                why = f": {self.error}" if self.error else " yet"
                raise RequestError(503, "the reward model is not loaded" + why)
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
    """The server's one Scorer, with the config's max_length and token budget (cfg.token_budget)."""
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    return Scorer.from_pretrained(
        cfg.model, device=cfg.device, dtype=dtype, max_length=cfg.max_length,
        max_tokens_per_batch=cfg.token_budget,
    )


def _description() -> str:
    import themis_engine.serve as package

    return (package.__doc__ or "").split("\n\n")[0]


def main(argv: list[str] | None = None) -> int:
    """`python -m themis_engine.serve MODEL ...`: 0 after a clean shutdown, 1 if loading failed, 2 on bad options."""
    try:
        cfg = parse_args(ServeConfig, argv, prog="python -m themis_engine.serve", description=_description())
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
