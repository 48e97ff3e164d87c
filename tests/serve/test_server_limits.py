"""The reward server's limits (issue 16): a per-text limit beside the body limit (an 8 MB query is a
413 at once, not 1.7 GB and a 37 s stall), lone UTF-16 surrogates are a 400 (not a 500), a client
that disconnects mid-body is one log line (no traceback), and a model folder that cannot be served
(no tokenizer files, no chat template, NaN weights) or a port outside 0-65535 is one line and exit
status 2, never a server that says it is ready. A real uvicorn on loopback; CPU, one tiny model."""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import socket
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from helpers import serving  # noqa: E402

import themis_engine as te  # noqa: E402
from themis_engine.serve.app import RewardServer, ServeConfig, load_scorer, main, parse_request  # noqa: E402
from themis_engine.serve.encoder import RequestError  # noqa: E402

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def scorer(tiny_rm_dir):
    return te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def live(scorer):
    server = RewardServer(ServeConfig(model="in-memory", max_length=MAX_LENGTH, max_batch_wait_ms=1), scorer=scorer)
    with serving(server) as base:
        yield base, "127.0.0.1", int(base.rsplit(":", 1)[1])


def _ready(base: str) -> bool:
    return httpx.get(base + "/health").json()["status"] == "ready"


# ------------------------------------------------------------------------------------------ requests
def test_parse_request_limits_the_text_and_refuses_lone_surrogates():
    body = lambda **kw: json.dumps(kw).encode()  # noqa: E731 -- json.dumps writes \\udXXX escapes
    assert parse_request(body(query=["a" * 10], prompts=["b" * 10]), max_chars=10) == (["a" * 10], ["b" * 10])
    for kw, where in ((dict(query=["ok", "a" * 11]), "'query'[1]"), (dict(query=["a"], prompts=["b" * 11]),
                                                                     "'prompts'[0]")):
        with pytest.raises(RequestError, match=re.escape(f"{where} is 11 characters, over the server's limit of 10")) \
                as err:
            parse_request(body(**kw), max_chars=10)
        assert err.value.status == 413
    for text, code in (("ab\ud800c", "D800"), ("\udc00", "DC00"), ("x\ude00\ud83d", "DE00")):
        with pytest.raises(RequestError, match=rf"lone UTF-16 surrogate \(U\+{code}\)") as err:
            parse_request(body(query=[text]))
        assert err.value.status == 400
    assert parse_request(b'{"query": ["smile \\ud83d\\ude00"]}')[0] == ["smile \U0001F600"]  # a pair is Unicode


def test_the_default_text_limit_follows_max_length():
    assert ServeConfig(model="m").query_char_limit == 64 * 4096
    assert ServeConfig(model="m", max_length=100).query_char_limit == 6400
    assert ServeConfig(model="m", max_query_chars=5).query_char_limit == 5


def test_an_8mb_query_is_refused_at_once_and_the_server_keeps_serving(live, scorer):
    base, _, _ = live
    limit = 64 * MAX_LENGTH
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    res = httpx.post(base + "/get_reward", json={"query": ["def f():\n    return 1\n" * 400_000]}, timeout=60)
    took = time.perf_counter() - t0
    assert res.status_code == 413, res.text
    assert f"'query'[0] is 8800000 characters, over the server's limit of {limit}" in res.json()["error"]
    assert took < 10, took
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 400, grown_mb  # (tokenizing it all grew the server by 1.7 GB)
    assert _ready(base)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
    ok = httpx.post(base + "/get_reward", json={"query": [text]})
    assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1


def test_a_lone_surrogate_is_a_400_not_a_500(live):
    base, _, _ = live
    res = httpx.post(base + "/get_reward", content=b'{"query": ["abc \\ud800 def"]}',
                     headers={"content-type": "application/json"})
    assert res.status_code == 400 and "lone UTF-16 surrogate (U+D800)" in res.json()["error"]
    assert _ready(base)


def test_a_client_that_disconnects_mid_body_is_one_log_line(live, caplog):
    base, host, port = live
    caplog.set_level(logging.INFO)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"query": ["abc')
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not [r for r in caplog.records if "disconnected" in r.getMessage()]:
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)
    time.sleep(0.2)
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None
    assert "after sending 15 of 1000 bytes of a /get_reward body" in gone[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or "scoring failed" in r.getMessage()]
    assert _ready(base)


def test_a_non_finite_score_is_null_counted_and_logged(tiny_rm_dir, caplog):
    broken = te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32, max_length=MAX_LENGTH)
    with torch.no_grad():
        broken.model.score.weight[2] = float("nan")  # one criterion's head (the weights on disk are refused)
    server = RewardServer(ServeConfig(model="in-memory", max_length=MAX_LENGTH, max_batch_wait_ms=1), scorer=broken)
    caplog.set_level(logging.WARNING)
    with serving(server) as base:
        text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
        res = httpx.post(base + "/get_reward", json={"query": [text, text + " there"]})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["extra_logs"][te.DEFAULT_CRITERIA[2]] == [None, None]
        assert all(isinstance(v, float) for v in body["rewards"])
        assert httpx.get(base + "/health").json()["non_finite_scores"] == 2
    assert any("2 of 2 queries got a non-finite score" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ the CLI
def _folder(tiny_rm_dir, tmp_path, *remove):
    path = tmp_path / "rm"
    shutil.copytree(tiny_rm_dir, path)
    for name in remove:
        (path / name).unlink()
    return path


@pytest.mark.parametrize("remove,message", [
    (("tokenizer.json", "tokenizer_config.json"), "no tokenizer files"),
    (("chat_template.jinja",), "the tokenizer has no chat template"),
])
def test_a_model_folder_that_cannot_be_served_is_one_line_before_the_server_starts(tiny_rm_dir, tmp_path, capsys,
                                                                                   remove, message):
    path = _folder(tiny_rm_dir, tmp_path, *remove)
    t0 = time.perf_counter()
    assert main([str(path), "--port", "0", "--device", "cpu"]) == 2
    assert time.perf_counter() - t0 < 30
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"themis_engine.serve: error: {path}: {message}")
    assert "Uvicorn running" not in captured.out + captured.err


def test_a_chat_template_given_on_the_command_line_serves_a_folder_without_one(tiny_rm_dir, tmp_path):
    from themis_engine.config import parse_args
    from themis_engine.testing.tiny import CHATML_TEMPLATE

    path = _folder(tiny_rm_dir, tmp_path, "chat_template.jinja")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    cfg = parse_args(ServeConfig, [str(path), "--chat_template", str(template), "--device", "cpu"])
    loaded = load_scorer(cfg)
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE


def test_nan_weights_end_the_server_with_one_line_and_status_2(tiny_rm_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = _folder(tiny_rm_dir, tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["model.embed_tokens.weight"][7, 3] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert main([str(path), "--port", "0", "--device", "cpu", "--log_level", "critical"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("themis_engine.serve: error: CheckpointError: ")
    assert "model.embed_tokens.weight (1 of" in err and "Traceback" not in err


def test_a_port_outside_the_range_is_one_line(capsys):
    assert main(["some/model", "--port", "70000"]) == 2
    assert capsys.readouterr().err == ("themis_engine.serve: error: port: expected a whole number in [0, 65535], "
                                       "got 70000\n")
