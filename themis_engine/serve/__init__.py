"""An HTTP reward server for OpenRLHF's remote reward model (0.11: `--reward.remote_url http://HOST:PORT/get_reward`).

    pip install "themis-engine[serve]"
    python -m themis_engine.serve path/to/rm --port 5000 [--head Functional_Correctness]

POST /get_reward   {"query": [str], "prompts": [str] (optional), "labels": [...] (optional, unused)}
               ->  {"rewards": [float], "scores": [float], "extra_logs": {criterion: [float]}}
GET  /health       200 {"status": "ready", "criteria": [...], "truncated", "prompt_mismatch",
                   "non_finite_scores", ...} once the model is loaded, else 503

A score that is not finite (NaN, inf) is sent as null (JSON has no NaN), logged and counted on
/health (`non_finite_scores`: queries with one in any criterion).

`rewards` and `scores` are the `head` criterion's scores; `extra_logs` holds every criterion's, one
value per query (OpenRLHF logs them). How the text becomes tokens (`--query_format`, encoder.py):

* templated (default): each query is the chat-templated prompt followed by the decoded response
  (possibly ending with EOS and pad tokens), scored as sent: pads dropped, the end made the RM
  template's end of an assistant turn. What the policy saw and wrote; not always what the RM was
  trained on (Qwen3's template renders an answer with an empty think block and rewrites newlines
  and think blocks).
* conversation (old name: plain): the response is taken out of the query and the conversation is
  rendered by the RM's own chat template, exactly the ids `Scorer.score` computes for it, i.e. what
  the RM was trained on. `prompts` are required: the user's text (OpenRLHF without
  --data.apply_chat_template; `--system` adds a system message), or the prompt rendered by the RM's
  own template family with its generation prompt (--data.apply_chat_template, a Qwen3 policy with a
  Qwen3 RM).

`prompts`, when given, group the queries of one prompt so that the prompt is computed once. A
prompt that is not a prefix of its query (OpenRLHF cuts long prompts from the left and still sends
them whole) is scored from the query, never refused, and counted in /health's `prompt_mismatch`.

Requests are gathered by a dynamic batcher: they queue up while the model is busy, and once it is
free it takes queued requests up to the token budget (`--max_tokens_per_batch`), waiting at most
`--max_batch_wait_ms` for more when the queue runs dry. Queries of one prompt (from any of the
batch's requests) share the prompt's prefix in the packed forward pass. Tokenization runs in one
thread, the model in another, the HTTP event loop in neither.

Sequences over `--max_length` are cut from the right with the template's closing tokens kept. The
server listens on loopback unless `--host` says otherwise; bodies over `--max_request_bytes` get a
413, and so does a query or prompt over `--max_query_chars` characters (default 64 per token of
`--max_length`: text that long could not be scored anyway, and tokenizing it all cost memory and
stalled the other clients); malformed bodies get a 400 with a message (also text holding a lone
UTF-16 surrogate, which is not Unicode), and the server keeps serving. A client that disconnects
before its body is read is one line in the log.

The model folder is checked before the server starts (model/folder.py): config.json, the
safetensors headers, the tokenizer files (a folder without them no longer becomes a one-token
tokenizer that gives every query the same reward), a chat template (or `--chat_template`), token
ids that fit the model's vocabulary; then NaN weights are an error while loading. Each is one line
naming the file and exit status 2, never a server that says it is ready.

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
