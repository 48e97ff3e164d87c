"""The reward server's settings: `python -m themis_engine.serve MODEL --port 5000 ...` (config.parse_args)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from themis_engine.config import check_number, option
from themis_engine.errors import ConfigError
from themis_engine.scoring.budget import DEFAULT_TOKENS_PER_BATCH, default_token_budget

# The default text limit per query and per prompt: this many characters per token of max_length.
# Real text runs 3-5 characters per token (code with long runs of spaces up to ~20); anything longer
# would be cut to max_length tokens anyway, after tokenizing it all (an 8 MB query grew the server
# by 1.7 GB and held the tokenizer thread for half a minute).
CHARS_PER_TOKEN = 64


@dataclass
class ServeConfig:
    """The OpenRLHF-compatible reward server."""

    model: str = option("", "reward model folder (HF *ForSequenceClassification safetensors + tokenizer)",
                        positional=True)
    host: str = option("127.0.0.1", "address to listen on (loopback by default; 0.0.0.0 accepts remote clients)")
    port: int = option(5000, "TCP port")
    max_length: int = option(4096, "longest sequence (prompt + response, templated) in tokens; longer ones are cut")
    max_tokens_per_batch: Optional[int] = option(
        None, f"token budget of one model call (default: {DEFAULT_TOKENS_PER_BATCH}, or max_length when larger); "
        "at least max_length"
    )
    max_batch_wait_ms: float = option(5.0, "how long an idle model waits for more requests to batch")
    max_request_bytes: int = option(32 * 2**20, "largest request body accepted (bigger: 413)")
    max_query_chars: Optional[int] = option(
        None, f"longest query (and prompt) text accepted, in characters (longer: 413); default: {CHARS_PER_TOKEN} "
        "per token of max_length (262144 for 4096): text beyond that could not be scored anyway"
    )
    head: str = option("0", "the criterion (name or index) whose score goes in 'rewards' and 'scores'")
    query_format: Literal["templated", "conversation", "plain"] = option(
        "templated", "templated: score the query text as sent; conversation (old name: plain): take the response "
        "out of the query and render the conversation with the reward model's own chat template, as it was "
        "trained (needs prompts: the user's text, or the prompt rendered by the same template)"
    )
    system: Optional[str] = option(None, "query_format=conversation, prompts of user text: a system message "
                                   "put before each prompt")
    device: Optional[str] = option(None, "cuda, cuda:1, cpu (default: cuda when available)")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(
        None, "weights' dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    chat_template: Optional[str] = option(
        None, "a Jinja chat template (a file, or the text) for a model folder whose tokenizer has none, or to "
        "replace its own; the server refuses to start on a folder without one"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = option("info", "uvicorn's log level")

    @property
    def query_char_limit(self) -> int:
        """max_query_chars, or CHARS_PER_TOKEN characters per token of max_length."""
        if self.max_query_chars is not None:
            return self.max_query_chars
        return CHARS_PER_TOKEN * self.max_length

    @property
    def token_budget(self) -> int:
        """max_tokens_per_batch, or the default rule (scoring.budget.default_token_budget) for max_length."""
        if self.max_tokens_per_batch is not None:
            return self.max_tokens_per_batch
        return default_token_budget(self.max_length)

    def check(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        if not self.model:
            raise ConfigError("MODEL (the reward model folder) is required")
        if not self.host.strip():
            raise ConfigError("host: expected an address to listen on (127.0.0.1, 0.0.0.0, ...), got ''")
        check_number("port", self.port, low=0, high=65535, integer=True)
        if self.max_length < 2:
            raise ConfigError(f"max_length: must be at least 2, got {self.max_length}")
        if self.max_tokens_per_batch is not None:
            check_number("max_tokens_per_batch", self.max_tokens_per_batch, low=1, integer=True)
        check_budget(self.token_budget, self.max_length)
        check_number("max_batch_wait_ms", self.max_batch_wait_ms, low=0)
        if self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes: must be positive, got {self.max_request_bytes}")
        if self.max_query_chars is not None:
            check_number("max_query_chars", self.max_query_chars, low=1, integer=True)


def check_budget(token_budget: int, max_length: int) -> None:
    """A batch must hold one sequence of max_length tokens."""
    if token_budget < max_length:
        raise ConfigError(
            f"max_tokens_per_batch={token_budget} is below max_length={max_length}: a sequence "
            "of max_length tokens would not fit a batch"
        )
