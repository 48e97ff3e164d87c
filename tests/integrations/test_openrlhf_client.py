"""Contract: OpenRLHF 0.11's OWN remote reward client against `python -m themis_engine.serve`.

In OpenRLHF 0.11 the reward of a rollout sample is fetched by the vLLM rollout actor itself:
`openrlhf.utils.agent.SingleTurnAgentExecutor.execute` tokenizes the prompt (cutting it from the LEFT
when it is longer than max_len - max_new_tokens), lets vLLM generate, decodes prompt + response ids
into `query` and POSTs {"query": [query], "prompts": [prompt], "labels": [label]} to each
`--reward.remote_url` (retrying 5 times); the answer's "rewards", "scores" and "extra_logs" become
the sample's reward, score and logged metrics. A failed request leaves the reward None, which in
remote-RM mode breaks the training step (experience_maker then asks for a reward model group).

These tests run that executor unchanged. Only the generator is replaced: `FakeVLLM` stands in for
the vLLM actor (`llm_engine.generate(prompt_token_ids, sampling_params, multi_modal_data=...)`) and
returns fixed response token ids, so no GPU, vLLM or ray is needed; the prompt tokenization, left
truncation, query decoding, HTTP request, retries and answer parsing are OpenRLHF's own code. The
server is the one the CLI builds (RewardServer + load_scorer, under uvicorn on a free loopback port)
serving the tiny session checkpoint, for both --query_format values; every reward must equal the
offline `Scorer.score` of the same conversation.

Install (CI: .ci/clients/openrlhf.sh): openrlhf==0.11.* WITHOUT its dependencies. The clients'
transformers pins conflict: openrlhf 0.11.2 requires transformers==5.15.0, verl 0.9.1 requires
>=5.5.3,<5.11 (trl 1.16 takes >=4.56.2), and this project is tested with the transformers 5.25 already
installed, so no resolver can put the three in one environment; and openrlhf's training dependencies
(deepspeed, flash-attn, ray, vllm) are never imported by its reward client. Only what
`openrlhf.utils.agent` imports at module level is added: aiohttp, pylatexenc (sympy, torch and
transformers are already there). No module is stubbed.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from helpers import conversation, random_text, require_client  # noqa: E402
from helpers import serving as live_server  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine.serve import RewardServer, ServeConfig, load_scorer  # noqa: E402

INSTALL = "bash .ci/clients/openrlhf.sh"
CRITERIA = list(te.DEFAULT_CRITERIA)
TOL = dict(atol=1e-5, rtol=1e-5)
WAIT_S = 60  # every wait is bounded


@pytest.fixture(scope="module")
def agent():
    """openrlhf.utils.agent: the module the vLLM rollout actors run the reward request from."""
    require_client("openrlhf", INSTALL)
    return require_client("openrlhf.utils.agent", INSTALL)


@pytest.fixture(scope="module")
def offline(tiny_rm_dir):
    return te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32)


@contextmanager
def serving(cfg: ServeConfig):
    """The server `python -m themis_engine.serve` builds for `cfg` (RewardServer, its model loaded by
    load_scorer in the model thread) under a real uvicorn on a free loopback port, in a background
    thread (the CLI process itself is tested in tests/serve/test_serve.py; a second interpreter here
    would cost ~20 s of imports). Yields the base URL once /health answers 200."""
    server = RewardServer(cfg, loader=lambda: load_scorer(cfg))
    with live_server(server) as base:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert server.error is None, f"the server failed: {server.error}"
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield base


@pytest.fixture(scope="module", params=["templated", "plain"])
def server(request, tiny_rm_dir):
    """The server for one --query_format (plain: with --head, so 'rewards' is not always head 0)."""
    fmt = request.param
    head = 0 if fmt == "templated" else 3
    cfg = ServeConfig(model=str(tiny_rm_dir), query_format=fmt, head=CRITERIA[head], device="cpu", dtype="float32",
                      max_batch_wait_ms=20)
    cfg.check()
    with serving(cfg) as base:
        yield SimpleNamespace(url=base, format=fmt, head=head)


# ------------------------------------------------------------------------ OpenRLHF's rollout
class FakeVLLM:
    """Stands in for OpenRLHF's vLLM rollout actor: `generate` returns the given response ids (what
    vLLM returns: the generated ids, their text, finish_reason; the EOS id included) and records the
    prompt ids OpenRLHF passed it (after its own left truncation)."""

    def __init__(self, tokenizer, response_ids: list[int]):
        self.tokenizer = tokenizer
        self.response_ids = list(response_ids)
        self.prompt_ids: list[int] | None = None

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        assert sampling_params.max_tokens >= len(self.response_ids)
        self.prompt_ids = list(prompt_token_ids)
        out = SimpleNamespace(token_ids=list(self.response_ids), finish_reason="stop", logprobs=None,
                              text=self.tokenizer.decode(self.response_ids, skip_special_tokens=False))
        return SimpleNamespace(outputs=[out])


def encode(tok, text: str) -> list[int]:
    """How OpenRLHF tokenizes a prompt (SingleTurnAgentExecutor.execute)."""
    return tok(text=text, add_special_tokens=False)["input_ids"]


def rollout(agent, url: str, tok, jobs: list[dict]) -> list[dict]:
    """Run OpenRLHF's SingleTurnAgentExecutor.execute for every job concurrently (as
    RolloutRayActor.generate_responses does for n samples); returns its output dicts.
    A job: prompt (the text OpenRLHF holds), response_ids, and optional max_new_tokens/max_len."""
    executor = agent.SingleTurnAgentExecutor(url + "/get_reward")  # what --reward.remote_url gives each actor
    engines = [FakeVLLM(tok, job["response_ids"]) for job in jobs]

    async def main():
        calls = [
            executor.execute(
                prompt=job["prompt"], label="",
                sampling_params=SimpleNamespace(max_tokens=job.get("max_new_tokens"), logprobs=None),
                max_length=job.get("max_len", 4096), hf_tokenizer=tok, llm_engine=engine,
            )
            for job, engine in zip(jobs, engines)
        ]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=WAIT_S)

    outputs = asyncio.run(main())
    for out, engine in zip(outputs, engines):
        out["_prompt_ids_generated_from"] = engine.prompt_ids
    return outputs


def chat_prompt(tok, prompt: str) -> str:
    """The prompt text OpenRLHF builds with --data.apply_chat_template (datasets/prompts_dataset.py)."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def openrlhf_prompt(tok, fmt: str, prompt: str) -> str:
    """templated server: OpenRLHF run with --data.apply_chat_template; plain: without it (raw prompt)."""
    return chat_prompt(tok, prompt) if fmt == "templated" else prompt


def make_items(seed: int, n_prompts: int, per_prompt: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n_prompts):
        p = random_text(rng, 8, 20)
        items += [(p, random_text(rng, 2, 12)) for _ in range(per_prompt)]
    return items


def stats(url: str) -> dict:
    body = httpx.get(url + "/health", timeout=10).json()
    assert body["status"] == "ready", body
    return body


# ------------------------------------------------------------------------ tests
def test_openrlhf_rollout_rewards_equal_the_offline_scorer(agent, server, offline):
    """(a) ordinary samples: 3 prompts x 3 sampled responses, each through OpenRLHF's executor."""
    tok = offline.tokenizer
    items = make_items(11, n_prompts=3, per_prompt=3)
    jobs = []
    for p, r in items:
        prompt = openrlhf_prompt(tok, server.format, p)
        # vLLM's ids: the response's tokens, then EOS (a stop token is part of the generated ids)
        response_ids = encode(tok, r) + [tok.eos_token_id]
        jobs.append({"prompt": prompt, "response_ids": response_ids})
        # the query OpenRLHF will send is the decoded prompt + response (checked here so that a
        # tokenizer round-trip difference is reported as such, not as a score mismatch)
        query = tok.decode(encode(tok, prompt) + response_ids, skip_special_tokens=False)
        assert query == prompt + r + tok.eos_token
    before = stats(server.url)
    outputs = rollout(agent, server.url, tok, jobs)
    assert stats(server.url)["prompt_mismatch"] == before["prompt_mismatch"]  # every query starts with its prompt
    expected = offline.score([conversation(p, r) for p, r in items])  # [N, H]
    for i, out in enumerate(outputs):
        assert out["_prompt_ids_generated_from"] == encode(tok, jobs[i]["prompt"])  # not truncated
        # OpenRLHF keeps the answer's lists as they come (one query per request): [reward]
        assert out["reward"] is not None, f"sample {i} got no reward (the request failed)"
        assert len(out["reward"]) == 1 and out["scores"] == out["reward"]
        torch.testing.assert_close(torch.tensor(out["reward"]), expected[i : i + 1, server.head], **TOL)
        assert list(out["extra_logs"]) == CRITERIA
        got = torch.tensor([out["extra_logs"][name][0] for name in CRITERIA])
        torch.testing.assert_close(got, expected[i], **TOL)
        # what samples_generator._process_response_into_experience then builds from it
        assert torch.tensor([out["reward"]]).dtype == torch.float32


def test_openrlhf_http_client_batches_and_shards(agent, server, offline):
    """OpenRLHF's HTTP client with many queries in one call and two endpoints (it shards the batch
    across the comma-separated --reward.remote_url list): one answer per shard, in order."""
    tok = offline.tokenizer
    items = make_items(12, n_prompts=2, per_prompt=3)
    prompts = [openrlhf_prompt(tok, server.format, p) for p, _ in items]
    queries = [prompt + r + tok.eos_token for prompt, (_, r) in zip(prompts, items)]
    executor = agent.SingleTurnAgentExecutor([server.url + "/get_reward", server.url + "/get_reward"])

    async def main():
        return await asyncio.wait_for(
            executor._fetch_rewards_via_http(queries, prompts, [""] * len(queries)), timeout=WAIT_S
        )

    answers = asyncio.run(main())
    assert len(answers) == 2 and all(set(a) == {"rewards", "scores", "extra_logs"} for a in answers)
    rewards = answers[0]["rewards"] + answers[1]["rewards"]
    expected = offline.score([conversation(p, r) for p, r in items])
    torch.testing.assert_close(torch.tensor(rewards), expected[:, server.head], **TOL)


def test_left_truncated_prompt_still_gets_a_reward(agent, server, offline):
    """(b) OpenRLHF cuts a prompt longer than max_len - max_new_tokens from the LEFT before
    generating, but still sends the full prompt in `prompts`: the query does not start with it. The
    sample must get a finite reward (never a refusal: OpenRLHF would retry 5 times and leave the
    reward None), and the server counts it on /health (`prompt_mismatch`)."""
    tok = offline.tokenizer
    rng = random.Random(13)
    p, r = random_text(rng, 25, 30), random_text(rng, 4, 8)
    prompt = openrlhf_prompt(tok, server.format, p)
    prompt_ids, response_ids = encode(tok, prompt), encode(tok, r) + [tok.eos_token_id]
    cut = 6
    job = {"prompt": prompt, "response_ids": response_ids, "max_new_tokens": len(response_ids),
           "max_len": len(prompt_ids) - cut + len(response_ids)}
    before = stats(server.url)
    t0 = time.monotonic()
    out, = rollout(agent, server.url, tok, [job])
    assert out["_prompt_ids_generated_from"] == prompt_ids[cut:]  # OpenRLHF did cut it from the left
    query = tok.decode(prompt_ids[cut:] + response_ids, skip_special_tokens=False)
    assert not query.startswith(prompt)
    assert out["reward"] is not None, "the left-truncated sample got no reward (the server refused the query)"
    assert time.monotonic() - t0 < 5, "the reward came only after OpenRLHF's retries"
    assert len(out["reward"]) == 1 and math.isfinite(out["reward"][0])
    assert all(math.isfinite(out["extra_logs"][name][0]) for name in CRITERIA)
    after = stats(server.url)
    assert after["prompt_mismatch"] == before["prompt_mismatch"] + 1, (before, after)
    assert after["stats"]["samples"] == before["stats"]["samples"] + 1
    if server.format == "plain":
        # the response is what follows the prompt's surviving end; the whole prompt + it is rendered
        # with the RM's template: the score of the untruncated conversation
        expected = offline.score([conversation(p, r)])
        torch.testing.assert_close(torch.tensor(out["reward"]), expected[:, server.head], **TOL)
    else:
        # templated: the query is scored as sent, as if the request had carried no prompts
        alone = httpx.post(server.url + "/get_reward", json={"query": [query]}, timeout=WAIT_S)
        assert alone.status_code == 200, alone.text
        torch.testing.assert_close(torch.tensor(out["reward"]), torch.tensor(alone.json()["rewards"]), **TOL)
        assert stats(server.url)["prompt_mismatch"] == after["prompt_mismatch"]


@pytest.mark.parametrize("fmt", ["templated", "plain"])
def test_prompt_longer_than_max_length_cut_by_openrlhf_gets_a_reward(agent, tiny_rm_dir, offline, fmt):
    """The usual reason for OpenRLHF's left cut: a prompt longer than --data.max_len. With the server's
    --max_length equal to OpenRLHF's --data.max_len, the sample OpenRLHF sends (at most max_len policy
    tokens) must still get a finite reward, although its whole prompt alone does not fit."""
    tok = offline.tokenizer
    max_len = 64
    rng = random.Random(14)
    p, r = random_text(rng, 60, 60), random_text(rng, 4, 6)
    prompt = openrlhf_prompt(tok, fmt, p)
    response_ids = encode(tok, r) + [tok.eos_token_id]
    assert len(encode(tok, prompt)) > max_len
    cfg = ServeConfig(model=str(tiny_rm_dir), query_format=fmt, device="cpu", dtype="float32", max_length=max_len,
                      max_batch_wait_ms=0)
    with serving(cfg) as base:
        out, = rollout(agent, base, tok, [{"prompt": prompt, "response_ids": response_ids,
                                            "max_new_tokens": len(response_ids), "max_len": max_len}])
        assert out["reward"] is not None, "the sample got no reward (the server refused the query)"
        assert len(out["reward"]) == 1 and math.isfinite(out["reward"][0])
        assert stats(base)["prompt_mismatch"] == 1
