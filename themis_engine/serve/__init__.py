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

The pieces:

    config.py    ServeConfig: the CLI options and their check
    encoder.py   QueryEncoder: query text -> token ids (Sample), through the chat module; RequestError
    batcher.py   DynamicBatcher, RewardService (the one Scorer the server loaded), BatchStats
    app.py       RewardServer (Starlette routes, lifecycle), parse_request, load_scorer, main
"""

from themis_engine.serve.app import RewardServer, load_scorer, main, parse_request
from themis_engine.serve.batcher import BatchStats, DynamicBatcher, RewardService
from themis_engine.serve.config import ServeConfig
from themis_engine.serve.encoder import QueryEncoder, RequestError, Sample

__all__ = [
    "BatchStats",
    "DynamicBatcher",
    "QueryEncoder",
    "RequestError",
    "RewardServer",
    "RewardService",
    "Sample",
    "ServeConfig",
    "load_scorer",
    "main",
    "parse_request",
]
