"""Bad input gets a clear error naming the item; overflow is truncated, skipped or refused, and counted."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import conversation, make_checkpoint

import themis_engine as te
from themis_engine import chat
from themis_engine.scoring.scorer import InputError


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    ckpt = make_checkpoint(root, "m", family="qwen3", num_labels=5)
    return te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def test_empty_list_gives_empty_tensor(scorer):
    out = scorer.score([])
    assert out.shape == (0, 5) and out.dtype == torch.float32
    c, r = scorer.score_pairs([], [], [])
    assert c.shape == (0, 5) and r.shape == (0, 5)
    assert scorer.score_groups([], []) == []


def test_conversation_must_end_with_assistant(scorer):
    good = conversation("p", "r")
    with pytest.raises(InputError, match=r"conversation 1: the last message has role 'user'"):
        scorer.score([good, good[:1]])
    with pytest.raises(InputError, match=r"conversation 0, message 0: each message needs"):
        scorer.score([[{"role": "user"}]])
    with pytest.raises(InputError, match=r"conversation 0: a conversation must be a non-empty list"):
        scorer.score([[]])


def test_mismatched_lengths_and_bad_prompts(scorer):
    with pytest.raises(InputError, match="2 prompts, 1 chosen, 2 rejected"):
        scorer.score_pairs(["a", "b"], ["x"], ["y", "z"])
    with pytest.raises(InputError, match="item 1: a prompt must be a string or a list of messages"):
        scorer.score_groups(["a", 3], [["x"], ["y"]])
    with pytest.raises(InputError, match="item 0: completions must be a non-empty list"):
        scorer.score_groups(["a"], [[]])


def test_group_over_explicit_budget_names_the_item(scorer):
    small = te.Scorer(scorer.model, scorer.tokenizer, max_tokens_per_batch=40)
    with pytest.raises(InputError, match=r"item 1: needs \d+ tokens, over the token budget of 40"):
        small.score_groups(["hi", "a much longer prompt " * 5], [["ok"], ["fine", "also fine"]])


def test_overflow_truncate_keeps_closing_tokens_and_counts(scorer):
    s = te.Scorer(scorer.model, scorer.tokenizer, max_length=40)
    long = conversation("short prompt", "word " * 200)
    ok = conversation("short prompt", "fine")
    out = s.score([long, ok])
    assert s.last_report.truncated == 1 and s.last_report.skipped == 0
    ids = s.tokenize([long])[0]
    assert len(ids) == 40
    closing = chat.encode_many(s.tokenizer, ["<|im_end|>\n"])[0]
    assert ids[-len(closing):] == closing
    # the truncated sequence scores like that same sequence given pre-tokenized
    alone = scorer.score_token_groups([[]], [[ids]])[0]
    assert torch.allclose(out[0], alone[0], atol=1e-6)
    assert torch.isfinite(out).all()


def test_overflow_skip_and_error(scorer):
    long = conversation("short prompt", "word " * 200)
    ok = conversation("short prompt", "fine")
    skip = te.Scorer(scorer.model, scorer.tokenizer, max_length=40, on_overflow="skip")
    out = skip.score([ok, long])
    assert skip.last_report.skipped == 1
    assert torch.isfinite(out[0]).all() and all(math.isnan(x) for x in out[1].tolist())
    err = te.Scorer(scorer.model, scorer.tokenizer, max_length=40, on_overflow="error")
    with pytest.raises(InputError, match=r"conversation 1: \d+ tokens, over max_length=40"):
        err.score([ok, long])


def test_prompt_alone_over_max_length_is_an_error(scorer):
    s = te.Scorer(scorer.model, scorer.tokenizer, max_length=30)
    with pytest.raises(InputError, match=r"conversation 0: the prompt alone is \d+ tokens"):
        s.score([conversation("prompt " * 50, "r")])
    skip = te.Scorer(scorer.model, scorer.tokenizer, max_length=30, on_overflow="skip")
    assert torch.isnan(skip.score([conversation("prompt " * 50, "r")])).all()


def test_bad_options():
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        te.Scorer(None, None, on_overflow="drop")
