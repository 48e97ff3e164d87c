"""The server's pieces without HTTP: the query encoder against Scorer.tokenize, the service on the
one Scorer it is given (its max_length, its budget, the report each call returns), the budget rule."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from helpers import conversation, make_checkpoint, random_text

import themis_engine as te
from themis_engine.errors import ConfigError, InputError
from themis_engine.scoring.budget import DEFAULT_TOKENS_PER_BATCH, default_token_budget
from themis_engine.serve import (
    QueryEncoder,
    RequestError,
    RewardServer,
    RewardService,
    Sample,
    ServeConfig,
    main,
    parse_request,
)

CRITERIA = list(te.DEFAULT_CRITERIA)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("service"), "rm", family="qwen3", criteria=CRITERIA)
    return te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def items(seed: int, n: int, long_every: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        response = "word " * 300 if long_every and i % long_every == 0 else random_text(rng, 2, 15)
        out.append((random_text(rng, 5, 20), response))
    return out


def test_public_names_import_from_the_package():
    import themis_engine.serve as serve
    from themis_engine.serve import app

    for name in ("RewardServer", "RewardService", "ServeConfig", "main", "QueryEncoder", "load_scorer"):
        assert getattr(serve, name) is getattr(app, name), name
    assert RewardServer and main and callable(parse_request)


def test_the_default_budget_is_the_one_rule():
    assert ServeConfig().token_budget == default_token_budget(4096) == DEFAULT_TOKENS_PER_BATCH
    assert ServeConfig(max_length=40000).token_budget == default_token_budget(40000) == 40000
    assert ServeConfig(max_tokens_per_batch=5000, max_length=100).token_budget == 5000
    with pytest.raises(ConfigError, match="below max_length"):
        ServeConfig(model="m", max_length=100, max_tokens_per_batch=50).check()


def test_plain_queries_encode_as_scorer_tokenize(scorer):
    cut = te.Scorer(scorer.model, scorer.tokenizer, max_length=120)
    pairs = items(0, 6, long_every=3)
    convs = [conversation(p, r, "be fair") for p, r in pairs]
    expected = cut.tokenize(convs)
    enc = QueryEncoder(scorer.tokenizer, cut.max_length, "plain", system="be fair")
    eos = scorer.tokenizer.eos_token
    got = enc.samples([p + r + eos for p, r in pairs], [p for p, _ in pairs])
    assert [s.ids for s in got] == expected
    assert [s.group_key for s in got] == [p for p, _ in pairs]
    assert enc.truncated == 2 and all(len(s.ids) <= 120 for s in got)
    with pytest.raises(RequestError, match="needs 'prompts'"):
        enc.samples(["abc"], None)
    with pytest.raises(InputError, match="query 0: the prompt alone is"):
        enc.samples(["word " * 300 + "ok"], ["word " * 300])


def test_templated_queries_are_closed_and_cut_keeping_the_closing(scorer):
    tok = scorer.tokenizer
    enc = QueryEncoder(tok, 64, "templated")
    prompt = tok.apply_chat_template([{"role": "user", "content": "p q r"}], tokenize=False,
                                     add_generation_prompt=True)
    full = tok.apply_chat_template(conversation("p q r", "word " * 200), tokenize=False)
    (s,) = enc.samples([prompt + "word " * 200 + tok.eos_token + tok.pad_token * 2], [prompt])
    whole = enc.encode(full)
    assert len(s.ids) == 64 and s.ids[-len(enc.closing_ids):] == enc.closing_ids
    assert s.ids[: 64 - len(enc.closing_ids)] == whole[: 64 - len(enc.closing_ids)]
    assert enc.truncated == 1


def test_a_prompt_cut_from_the_left_is_scored_from_the_query_and_counted(scorer):
    """OpenRLHF cuts a long prompt's first tokens but sends the whole prompt: never a 400."""
    tok = scorer.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "sum a list of numbers fast"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    cut_prompt = tok.decode(ids[3:])
    assert not prompt.startswith(cut_prompt) and prompt.endswith(cut_prompt)
    response = "def f(xs): return sum(xs)"
    enc = QueryEncoder(tok, 4096, "templated")
    (s,) = enc.samples([cut_prompt + response + tok.eos_token], [prompt])
    assert s.ids == enc.encode(cut_prompt + response + enc.closing) and s.group_key is None
    assert enc.prompt_mismatch == 1
    # plain: the response is what follows the matched end of the prompt, rendered with the whole prompt
    plain = QueryEncoder(tok, 4096, "plain")
    user = "sum a list of numbers fast"
    (p,) = plain.samples([user[5:] + response + tok.eos_token], [user])
    assert p.ids == scorer.tokenize([conversation(user, response)])[0]
    assert plain.prompt_mismatch == 1
    # nothing in common: the whole query is the response
    (q,) = plain.samples(["zzz"], [user])
    assert q.ids == scorer.tokenize([conversation(user, "zzz")])[0] and plain.prompt_mismatch == 2
    # the whole prompt does not fit max_length: the part in the query; then that part cut from the left
    long_user = "word " * 40 + "end"
    seen_ids = scorer.tokenize([conversation(long_user[-20:], response)])[0]
    n = len(seen_ids) + 2
    assert len(scorer.tokenize([conversation(long_user, response)])[0]) > n
    small = QueryEncoder(tok, n, "plain")
    (r,) = small.samples([long_user[-20:] + response], [long_user])
    assert r.ids == seen_ids
    (t,) = small.samples([long_user[-150:] + response], [long_user])
    assert 0 < len(t.ids) <= n and tok.decode(t.ids).endswith(response + "<|im_end|>\n")
    assert small.prompt_mismatch == 2


def test_the_service_scores_with_the_one_scorer_it_is_given(scorer):
    one = te.Scorer(scorer.model, scorer.tokenizer, max_length=100, max_tokens_per_batch=3000)
    service = RewardService(one, ServeConfig(model="m", max_length=100, query_format="plain"))
    assert service.scorer is one and service.max_length == 100 and service.budget == 3000
    assert service.encoder.max_length == 100
    # no budget on the scorer: the default rule for its max_length
    assert RewardService(scorer, ServeConfig(model="m")).budget == default_token_budget(scorer.max_length)
    with pytest.raises(ConfigError, match="below max_length"):
        RewardService(te.Scorer(scorer.model, scorer.tokenizer, max_length=100, max_tokens_per_batch=50),
                      ServeConfig(model="m"))

    pairs = items(1, 8, long_every=4)
    expected = one.score([conversation(p, r) for p, r in pairs])
    eos = scorer.tokenizer.eos_token
    requests = [service.encoder.samples([p + r + eos for p, r in pairs[i : i + 2]], [p for p, _ in pairs[i : i + 2]])
                for i in range(0, 8, 2)]
    one.last_report = te.ScoreReport()  # the service never reads the shared per-call state
    out = service.run_batch(requests)
    torch.testing.assert_close(torch.cat(out), expected, **TOL)
    ids = [[s.ids] for r in requests for s in r]
    _, report = one.score_token_groups([[] for _ in ids], ids, return_report=True)
    st = service.stats
    assert (st.batches, st.requests, st.samples, st.most_requests_in_a_batch) == (1, 4, 8, 4)
    assert st.tokens_standalone == report.tokens_standalone


def test_one_bad_request_does_not_fail_the_batch(scorer):
    service = RewardService(scorer, ServeConfig(model="m"))
    good = [Sample(scorer.tokenize([conversation("a b", "c d")])[0], None)]
    bad = [Sample([], None)]
    out = service.run_batch([good, bad, good])
    assert isinstance(out[1], Exception) and not isinstance(out[0], Exception)
    torch.testing.assert_close(out[0], out[2], **TOL)


def test_concurrent_services_on_one_scorer_keep_their_own_counts(scorer):
    """Two threads share one Scorer; each service's stats are those of its own calls."""
    services = [RewardService(scorer, ServeConfig(model="m")) for _ in range(2)]
    pairs = [items(10 + t, 6) for t in range(2)]
    samples = [[Sample(ids, None) for ids in scorer.tokenize([conversation(p, r) for p, r in ps])] for ps in pairs]
    expected = [scorer.score([conversation(p, r) for p, r in ps]) for ps in pairs]
    results: list = [None, None]

    def work(t):
        for _ in range(5):
            results[t] = services[t].run_batch([samples[t]])[0]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for t in range(2):
        torch.testing.assert_close(results[t], expected[t], **TOL)
        standalone = sum(len(s.ids) for s in samples[t])
        assert services[t].stats.tokens_standalone == 5 * standalone
        assert services[t].stats.batches == 5
