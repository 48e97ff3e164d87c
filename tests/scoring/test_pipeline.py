"""The text-in pipeline: chunks encoded by a producer thread ahead of the device give the same scores
as the same chunks run one after the other (bit for bit) and as one whole-call plan (to rounding);
names, reports and ids stay those of the whole call; the evaluator's stream runs across batches."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import conversation, random_text

import themis_engine as te
from themis_engine.errors import InputError


@pytest.fixture(scope="module")
def scorer(tiny_rm_dir):
    return te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32, max_length=192)


def _pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [random_text(rng, 3, 12) for _ in range(n)]
    chosen = [random_text(rng, 1, 25 if i % 7 else 120) for i in range(n)]  # some over max_length
    rejected = [random_text(rng, 1, 20) for _ in range(n)]
    return prompts, chosen, rejected


def _with(scorer, pipeline: bool, chunk: int):
    s = te.Scorer(scorer.model, scorer.tokenizer, max_length=scorer.max_length)
    s.pipeline, s.chunk_sequences = pipeline, chunk
    return s


def test_pipelined_equals_the_same_chunks_in_turn_and_the_whole_call(scorer):
    prompts, chosen, rejected = _pairs(40)
    piped = _with(scorer, True, 4)
    c1, r1 = piped.score_pairs(prompts, chosen, rejected)
    report = piped.last_report
    assert report.micro_batches >= 4  # several chunks (4, 8, 16, ... sequences)
    serial = _with(scorer, False, 4)
    c2, r2 = serial.score_pairs(prompts, chosen, rejected)
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    whole = _with(scorer, True, 10_000)
    c3, r3 = whole.score_pairs(prompts, chosen, rejected)
    torch.testing.assert_close(c1, c3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1, r3, atol=1e-5, rtol=1e-5)
    # the report is the whole call's: every sequence, in order, as tokenize gives them
    convs = [conversation(p, a) for p, c, r in zip(prompts, chosen, rejected) for a in (c, r)]
    assert report.sequences == 80 and report.ids == piped.tokenize(convs)
    assert report.truncated == whole.last_report.truncated > 0
    assert report.tokens_standalone == whole.last_report.tokens_standalone


def test_errors_name_the_callers_item_in_any_chunk(scorer):
    convs = [conversation("p", "r")] * 30
    bad = list(convs)
    bad[23] = [{"role": "user", "content": "no answer"}]
    with pytest.raises(InputError, match=r"conversation 23: the last message has role 'user'"):
        _with(scorer, True, 4).score(bad)
    small = _with(scorer, True, 4)
    small.max_tokens_per_batch = 40
    prompts = ["hi"] * 12 + ["a much longer prompt " * 5]
    with pytest.raises(InputError, match=r"item 12: needs \d+ tokens, over the token budget of 40"):
        small.score_groups(prompts, [["ok"]] * 12 + [["fine", "also fine"]])


def test_the_stream_scores_each_batch_as_score_pairs_does(scorer):
    prompts, chosen, rejected = _pairs(30, seed=1)
    batches = [(prompts[a:b], chosen[a:b], rejected[a:b], None) for a, b in ((0, 7), (7, 8), (8, 30))]
    s = _with(scorer, True, 4)
    got = list(s.score_pairs_stream(iter(batches)))
    assert len(got) == 3
    for (p, c, r, _), (gc, gr, report) in zip(batches, got):
        wc, wr = te.Scorer(scorer.model, scorer.tokenizer, max_length=scorer.max_length).score_pairs(p, c, r)
        torch.testing.assert_close(gc, wc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gr, wr, atol=1e-5, rtol=1e-5)
        assert report.sequences == 2 * len(p)
    assert s.score_pairs([], [], [])[0].shape == (0, len(scorer.criteria))


def test_the_producer_runs_ahead_of_the_device(scorer, monkeypatch):
    """While chunk i's micro-batches are launched, chunk i+1 is encoded on another thread: the first
    forward waits (at most 10 s) for the second chunk's encoding to start, which only a producer
    running ahead can do; the forwards stay on the caller's thread."""
    import threading

    s = _with(scorer, True, 4)
    encoders, forwards, second_started, overlapped = [], [], threading.Event(), []
    real_encode, real_forward = s._tokenize_many, s.model.forward

    def encode(*a, **k):
        encoders.append(threading.current_thread().name)
        if len(encoders) == 2:
            second_started.set()
        return real_encode(*a, **k)

    def forward(*a, **k):
        if not forwards:
            overlapped.append(second_started.wait(10))
        forwards.append(threading.current_thread().name)
        return real_forward(*a, **k)

    monkeypatch.setattr(s, "_tokenize_many", encode)
    monkeypatch.setattr(s.model, "forward", forward)
    prompts, chosen, rejected = _pairs(20, seed=2)
    s.score_pairs(prompts, chosen, rejected)
    assert overlapped == [True]
    assert len(encoders) >= 3 and all(name.startswith("themis-tokenize") for name in encoders)
    assert set(forwards) == {threading.current_thread().name}
