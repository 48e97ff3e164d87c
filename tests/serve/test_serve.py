"""The OpenRLHF reward server: a real uvicorn on a loopback port, concurrent single-sample clients,
malformed input, readiness, the CLI; every answer equal to the offline Scorer score."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from helpers import conversation, make_checkpoint, random_text, serving  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine.config import parse_args  # noqa: E402
from themis_engine.serve.app import RewardServer, RewardService, ServeConfig, main  # noqa: E402

CRITERIA = list(te.DEFAULT_CRITERIA)
TOL = dict(atol=1e-5, rtol=1e-5)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"), "rm", family="qwen3", criteria=CRITERIA)


@pytest.fixture(scope="module")
def offline(ckpt):
    return te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def live(offline):
    """The module's server (templated queries, head 0): .url and .server."""
    cfg = ServeConfig(model="in-memory", max_batch_wait_ms=20, max_request_bytes=64 * 1024)
    server = RewardServer(cfg, scorer=offline)
    with serving(server) as base:
        yield SimpleNamespace(url=base, server=server)


def templated(tok, prompt: str) -> str:
    """What OpenRLHF sends as `prompts` with --apply_chat_template."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def samples(seed: int, num_prompts: int, per_prompt: int):
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        p = random_text(rng, 10, 25)
        out += [(p, random_text(rng, 2, 15)) for _ in range(per_prompt)]
    return out


def check_answer(answer: dict, expected: torch.Tensor, head: int = 0):
    assert set(answer) == {"rewards", "scores", "extra_logs"}
    torch.testing.assert_close(torch.tensor(answer["rewards"]), expected[:, head], **TOL)
    assert answer["scores"] == answer["rewards"]
    assert list(answer["extra_logs"]) == CRITERIA
    for j, name in enumerate(CRITERIA):
        torch.testing.assert_close(torch.tensor(answer["extra_logs"][name]), expected[:, j], **TOL)


def test_health_reports_ready_with_criteria(live):
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["criteria"] == CRITERIA and body["head"] == CRITERIA[0]


def test_32_concurrent_single_sample_clients(live, offline):
    tok = offline.tokenizer
    items = samples(0, num_prompts=8, per_prompt=4)
    expected = offline.score([conversation(p, r) for p, r in items])
    # OpenRLHF's query: templated prompt + decoded response with its EOS, sometimes right padding
    pad = tok.pad_token
    bodies = [
        {"query": [templated(tok, p) + r + tok.eos_token + pad * (i % 3)], "prompts": [templated(tok, p)],
         "labels": [None]}
        for i, (p, r) in enumerate(items)
    ]
    answers: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i):
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            answers[i] = c.post(live.url + "/get_reward", json=bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    before = dict(vars(live.server.service.stats))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, r in enumerate(answers):
        assert r is not None and r.status_code == 200, (i, r and r.text)
        check_answer(r.json(), expected[i : i + 1])
    stats = vars(live.server.service.stats)
    assert stats["requests"] - before["requests"] == 32
    assert stats["batches"] - before["batches"] < 32  # requests were gathered
    assert stats["most_requests_in_a_batch"] > 1


def test_one_request_many_queries_shares_prompts_and_works_without_prompts(live, offline):
    tok = offline.tokenizer
    items = samples(1, num_prompts=3, per_prompt=4)
    expected = offline.score([conversation(p, r) for p, r in items])
    stats = live.server.service.stats
    computed, standalone = stats.tokens_computed, stats.tokens_standalone
    body = {"query": [templated(tok, p) + r + tok.eos_token for p, r in items],
            "prompts": [templated(tok, p) for p, _ in items]}
    r = httpx.post(live.url + "/get_reward", json=body)
    assert r.status_code == 200, r.text
    check_answer(r.json(), expected)
    assert stats.tokens_computed - computed < stats.tokens_standalone - standalone  # prefixes computed once
    # no prompts: each query is whole templated text, with or without its closing
    full = [tok.apply_chat_template(conversation(p, r), tokenize=False) for p, r in items]
    mixed = [q if i % 2 else templated(tok, p) + r for i, (q, (p, r)) in enumerate(zip(full, items))]
    r = httpx.post(live.url + "/get_reward", json={"query": mixed})
    assert r.status_code == 200, r.text
    check_answer(r.json(), expected)


BAD_REQUESTS = [
    ("not json", b"{query: [", 400, "not valid JSON"),
    ("not utf-8", b"\xff\xfe", 400, "not valid JSON"),
    ("array", json.dumps([1, 2]).encode(), 400, "must be a JSON object"),
    ("no query", json.dumps({"prompts": ["a"]}).encode(), 400, "missing field 'query'"),
    ("query is str", json.dumps({"query": "a"}).encode(), 400, "'query' must be a list of strings"),
    ("query item int", json.dumps({"query": ["a", 3]}).encode(), 400, r"'query'\[1\] must be a string"),
    ("empty query", json.dumps({"query": []}).encode(), 400, "'query' is an empty list"),
    ("empty prompts", json.dumps({"query": ["a"], "prompts": []}).encode(), 400, "'prompts' is an empty list"),
    ("prompt count", json.dumps({"query": ["a", "b"], "prompts": ["a"]}).encode(), 400, "1 items for 2 queries"),
    ("labels type", json.dumps({"query": ["a"], "labels": "x"}).encode(), 400, "'labels' must be a list"),
    ("deep nesting", b"[" * 20_000 + b"]" * 20_000, 400, "nested too deeply"),
    ("oversized", json.dumps({"query": ["x" * 100_000]}).encode(), 413, "over the server's limit"),
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(live, offline):
    tok = offline.tokenizer
    (p, r), = samples(2, 1, 1)
    expected = offline.score([conversation(p, r)])
    good = {"query": [templated(tok, p) + r + tok.eos_token], "prompts": [templated(tok, p)]}
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for name, body, status, message in BAD_REQUESTS:
            res = c.post("/get_reward", content=body, headers={"content-type": "application/json"})
            assert res.status_code == status, (name, res.text)
            assert res.json()["error"] and re.search(message, res.json()["error"]), (name, res.text)
            ok = c.post("/get_reward", json=good)
            assert ok.status_code == 200, (name, ok.text)
            check_answer(ok.json(), expected)
        # a chunked body (no Content-Length) over the limit, and a wrong method
        res = c.post("/get_reward", content=iter([b'{"query": ["' + b"x" * 40_000, b"x" * 40_000 + b'"]}']))
        assert res.status_code == 413
        assert c.get("/get_reward").status_code == 405
        assert c.post("/get_reward", json=good).status_code == 200


def test_plain_query_format_and_truncation_match_the_scorer(ckpt, offline):
    items = samples(3, num_prompts=2, per_prompt=3)
    items.append(("short prompt", "word " * 300))  # over max_length: cut, closing tokens kept
    cut = te.Scorer(offline.model, offline.tokenizer, max_length=160)
    expected = cut.score([conversation(p, r, "be strict") for p, r in items])
    assert cut.last_report.truncated == 1
    cfg = ServeConfig(model="in-memory", query_format="plain", system="be strict", max_length=160,
                      head="Security_Hardness")
    server = RewardServer(cfg, scorer=cut)  # the server scores with this one scorer, at its max_length
    with serving(server) as base:
        body = {"query": [p + r + offline.tokenizer.eos_token for p, r in items], "prompts": [p for p, _ in items]}
        res = httpx.post(base + "/get_reward", json=body)
        assert res.status_code == 200, res.text
        check_answer(res.json(), expected, head=4)
        assert httpx.get(base + "/health").json()["truncated"] == 1
        res = httpx.post(base + "/get_reward", json={"query": ["abc"]})
        assert res.status_code == 400 and "needs 'prompts'" in res.json()["error"]
        long_prompt = "word " * 300
        res = httpx.post(base + "/get_reward", json={"query": [long_prompt + "ok"], "prompts": [long_prompt]})
        assert res.status_code == 400 and "query 0: the prompt alone is" in res.json()["error"]
        assert httpx.post(base + "/get_reward", json=body).status_code == 200


def test_health_is_503_until_the_model_is_loaded(offline):
    release = threading.Event()

    def slow_loader():
        release.wait(10)
        return offline

    with serving(RewardServer(ServeConfig(model="m"), loader=slow_loader)) as base:
        res = httpx.get(base + "/health")
        assert res.status_code == 503 and res.json()["status"] == "loading"
        assert httpx.post(base + "/get_reward", json={"query": ["a"]}).status_code == 503
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def broken_loader():
        raise FileNotFoundError("no such model")

    with serving(RewardServer(ServeConfig(model="m"), loader=broken_loader)) as base:
        deadline = time.monotonic() + 10
        while (res := httpx.get(base + "/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert res.status_code == 503 and "no such model" in res.json()["error"]


def test_config_parsing_and_errors(ckpt, offline, capsys):
    cfg = parse_args(ServeConfig, [str(ckpt), "--port", "1234", "--head", "Security_Hardness",
                                   "--max_batch_wait_ms=2.5", "--dtype", "bfloat16"])
    got = (cfg.model, cfg.port, cfg.head, cfg.max_batch_wait_ms, cfg.dtype)
    assert got == (str(ckpt), 1234, "Security_Hardness", 2.5, "bfloat16")
    assert cfg.host == "127.0.0.1" and cfg.token_budget == 16384
    assert main([str(ckpt), "--max_length", "100", "--max_tokens_per_batch", "50"]) == 2
    assert "below max_length" in capsys.readouterr().err
    assert main([]) == 2
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "--max_request_bytes" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown criterion 'Speed'"):
        RewardService(offline, ServeConfig(model="m", head="Speed"))


def test_cli_serves_on_loopback(ckpt, offline):
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "themis_engine.serve", str(ckpt), "--port", str(port), "--device", "cpu",
         "--head", "2", "--log_level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        (p, r), = samples(4, 1, 1)
        tok = offline.tokenizer
        res = httpx.post(base + "/get_reward", json={"query": [templated(tok, p) + r], "prompts": [templated(tok, p)]})
        assert res.status_code == 200, res.text
        check_answer(res.json(), offline.score([conversation(p, r)]), head=2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
