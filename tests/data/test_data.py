"""Training data: schemas, validation errors naming file/row/column, criteria prompts, tokenization
(Scorer-identical templating, truncation, the on-disk cache)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from themis_engine import data as D
from themis_engine.data.prompts import ALL_CRITERIA_PROMPT, CRITERION_PROMPTS, CriteriaPrompts
from themis_engine.data.tables import DataError, write_jsonl, write_parquet
from themis_engine.model.args import DEFAULT_CRITERIA
from themis_engine.scoring.scorer import Scorer
from themis_engine.testing.tiny import build_tokenizer

CRITERIA = list(DEFAULT_CRITERIA)


def write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".parquet":
        write_parquet({k: [r.get(k) for r in rows] for k in rows[0]}, path)
    else:
        write_jsonl(rows, path)
    return str(path)


def themis_row(i: int = 0, **kw) -> dict:
    row = dict(system="Be strict.", input=f"Sum a list {i}.", chosen="def f(xs):\n    return sum(xs)\n",
               rejected="def f(xs):\n    return 0\n", language="Python", aspect="Functional_Correctness")
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


class _StubModel:
    """Scorer needs only .eval() for tokenization."""

    def eval(self):
        return self


# ============================================================================================ schemas
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_themis_schema(tmp_path, suffix):
    path = write(tmp_path / f"t{suffix}", [themis_row(0), themis_row(1, system="", aspect="Security_Hardness")])
    pairs, report = D.load_pairs(path, criteria=CRITERIA)
    assert report.schemas[path] == "themis" and report.rows == report.kept == 2 and report.skipped == 0
    p = pairs[0]
    assert (p.prompt, p.system, p.aspect) == ("Sum a list 0.", "Be strict.", "Functional_Correctness")
    assert p.language == "Python"
    assert p.chosen.startswith("def f") and p.source == f"{path}:row 1"
    assert pairs[1].system is None  # an empty system text is no system message


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_crb_schema(tmp_path, suffix):
    rows = [dict(id=f"crb-{i}", prompt=f"task {i}", chosen="good", rejected="bad", aspect="Memory_Efficiency",
                 language="Go", subset="commits") for i in range(3)]
    path = write(tmp_path / f"c{suffix}", rows)
    pairs, report = D.load_pairs(path, criteria=CRITERIA)
    assert report.schemas[path] == "crb"
    assert [p.id for p in pairs] == ["crb-0", "crb-1", "crb-2"]
    assert pairs[2].subset == "commits" and pairs[2].language == "Go" and pairs[2].prompt == "task 2"


def test_trl_text_and_conversational(tmp_path):
    sys_msg = {"role": "system", "content": "You review code."}
    user = {"role": "user", "content": "Write add."}
    rows = [
        dict(prompt="Write add.", chosen="a + b", rejected="a - b", margin=0.5),
        dict(chosen="The answer is a + b", rejected="The answer is a - b"),  # implicit prompt, text
        dict(prompt=[sys_msg, user], chosen=[{"role": "assistant", "content": "a + b"}],
             rejected=[{"role": "assistant", "content": "a - b"}]),
        dict(chosen=[sys_msg, user, {"role": "assistant", "content": "a + b"}],  # implicit prompt, messages
             rejected=[sys_msg, user, {"role": "assistant", "content": "a - b"}]),
        dict(prompt=[user, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and sub?"}],
             chosen="a - b", rejected="a + b"),
    ]
    path = write(tmp_path / "trl.jsonl", rows)
    pairs, report = D.load_pairs(path)
    assert report.schemas[path] == "trl" and len(pairs) == 5
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].margin) == ("Write add.", "a + b", 0.5)
    assert pairs[1].prompt == [] and pairs[1].chosen == "The answer is a + b"
    for p in pairs[2:4]:  # canonical form: system hoisted, single turns as text
        assert (p.system, p.prompt, p.chosen, p.rejected) == ("You review code.", "Write add.", "a + b", "a - b")
    assert isinstance(pairs[4].prompt, list) and len(pairs[4].prompt) == 3


def test_trl_conversational_parquet_and_shared_assistant_turns(tmp_path):
    user = {"role": "user", "content": "q"}
    rows = [dict(chosen=[user, {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}],
                 rejected=[user, {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "z"}])]
    path = write(tmp_path / "conv.parquet", rows)
    (p,), _ = D.load_pairs(path, schema="trl")
    # a prompt never ends with an assistant turn: the shared one opens both answers
    assert p.prompt == "q"
    assert p.chosen == [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]


def test_column_remap_and_aspect_spelling(tmp_path):
    rows = [dict(question="Sum.", better="good", worse="bad", category="functional correctness", lang="C")]
    path = write(tmp_path / "r.jsonl", rows)
    columns = {"prompt": "question", "chosen": "better", "rejected": "worse", "aspect": "category", "language": "lang"}
    (p,), report = D.load_pairs(path, schema="crb", columns=columns, criteria=CRITERIA)
    assert (p.prompt, p.chosen, p.rejected, p.language) == ("Sum.", "good", "bad", "C")
    assert p.aspect == "Functional_Correctness"
    with pytest.raises(DataError, match=r"r\.jsonl, row 1, column 'answer_a' \(as 'chosen'\): missing from the file"):
        D.load_pairs(path, columns={"chosen": "answer_a"})


def test_folder_and_several_files(tmp_path):
    write(tmp_path / "a.jsonl", [themis_row(0)])
    write(tmp_path / "b.parquet", [themis_row(1), themis_row(2)])
    pairs, report = D.load_pairs(tmp_path)
    assert len(pairs) == 3 and len(report.files) == 2
    pairs, _ = D.load_pairs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")])
    assert [p.prompt for p in pairs] == ["Sum a list 0.", "Sum a list 1.", "Sum a list 2."]


def test_pairs_to_rows_round_trip(tmp_path):
    pairs, _ = D.load_pairs(write(tmp_path / "t.jsonl", [themis_row(0), themis_row(1)]))
    for schema in D.SCHEMAS:
        again, _ = D.load_pairs(write(tmp_path / f"{schema}.jsonl", D.pairs_to_rows(pairs, schema)), schema=schema)
        fields = ("prompt", "chosen", "rejected", "aspect", "language")
        for a, b in zip(pairs, again):
            assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


# ============================================================================================ bad data
BAD_ROWS = [
    # (row 2 replaced by, column named, reason, message part)
    (lambda r: {k: v for k, v in r.items() if k != "chosen"}, "chosen", "missing_column", "missing"),
    (lambda r: dict(r, rejected="   "), "rejected", "empty_field", "empty text"),
    (lambda r: dict(r, input=None), "input", "empty_field", r"empty \(null\)"),
    (lambda r: dict(r, chosen=42), "chosen", "not_a_string", "expected a string, got int"),
    (lambda r: dict(r, chosen=[{"role": "assistant", "content": "x"}]), "chosen", "not_a_string", "got list"),
    (lambda r: dict(r, aspect="Speed"), "aspect", "unknown_aspect", "unknown aspect 'Speed'"),
    (lambda r: dict(r, language=3), "language", "not_a_string", "expected a string"),
    (lambda r: dict(r, margin="high"), "margin", "bad_margin", "expected a finite number"),
    (lambda r: dict(r, rejected=r["chosen"]), "rejected", "identical", "identical to chosen"),
]


# a Parquet column has one type and is in every row: the cases that fit it
_BAD_CASES = [(i, ".jsonl") for i in range(len(BAD_ROWS))] + [(i, ".parquet") for i in (1, 2, 5, 8)]


@pytest.mark.parametrize("case,suffix", _BAD_CASES)
def test_bad_row_error_names_file_row_column(tmp_path, case, suffix):
    change, column, reason, text = BAD_ROWS[case]
    rows = [themis_row(0), change(themis_row(1)), themis_row(2)]  # case 0: the column is in the file, not in row 2
    path = write(tmp_path / f"bad{suffix}", rows)
    with pytest.raises(DataError, match=rf"bad{suffix}, row 2, column '{column}': .*{text}"):
        D.load_pairs(path, criteria=CRITERIA)
    pairs, report = D.load_pairs(path, criteria=CRITERIA, on_bad_row="skip")
    assert len(pairs) == 2 and report.skipped == 1 and report.skipped_reasons == {reason: 1}
    assert [p.source for p in pairs] == [f"{path}:row 1", f"{path}:row 3"]


MALFORMED_MESSAGES = [
    (dict(chosen=[{"role": "assistant"}], rejected=[{"role": "assistant", "content": "x"}]), "chosen",
     "message 0 has no string 'content'"),
    (dict(chosen=[{"role": "user", "content": "x"}], rejected="y", prompt="p"), "chosen",
     "the last message has role 'user'"),
    (dict(chosen=["x"], rejected="y", prompt="p"), "chosen", "message 0 is a str"),
    (dict(chosen="x", rejected="y", prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
     "prompt", "ends with an assistant turn"),
    (dict(chosen=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], rejected="b"), "chosen",
     "both be text or both be message lists"),
    (dict(chosen=[{"role": "assistant", "content": "  "}], rejected="b", prompt="p"), "chosen",
     "final assistant message is empty"),
]


@pytest.mark.parametrize("case", range(len(MALFORMED_MESSAGES)))
def test_malformed_message_lists(tmp_path, case):
    row, column, text = MALFORMED_MESSAGES[case]
    good = dict(prompt="p", chosen="x", rejected="y")
    path = write(tmp_path / "m.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"m\.jsonl, row 2, column '{column}': .*{text}"):
        D.load_pairs(path, schema="trl")
    pairs, report = D.load_pairs(path, schema="trl", on_bad_row="skip")
    assert len(pairs) == 1 and report.skipped == 1


def test_skip_counts_by_reason_and_empty_after_filtering(tmp_path):
    rows = [themis_row(0), themis_row(1, aspect="Speed"), themis_row(2, chosen=""), themis_row(3, aspect="Style"),
            themis_row(4)]
    path = write(tmp_path / "mix.jsonl", rows)
    pairs, report = D.load_pairs(path, criteria=CRITERIA, on_bad_row="skip")
    assert (report.rows, report.kept, report.skipped) == (5, 2, 3)
    assert report.skipped_reasons == {"empty_field": 1, "unknown_aspect": 2}
    assert "3 skipped" in report.summary()
    only_bad = write(tmp_path / "bad.jsonl", rows[1:4])
    with pytest.raises(DataError, match="no preference pairs left in .*bad.jsonl.*3 skipped"):
        D.load_pairs(only_bad, criteria=CRITERIA, on_bad_row="skip")
    # criteria=None accepts any aspect
    assert len(D.load_pairs(only_bad, on_bad_row="skip")[0]) == 2


def test_file_problems(tmp_path):
    with pytest.raises(DataError, match=r"nowhere/train\.jsonl: no such file"):
        D.load_pairs(str(tmp_path / "nowhere" / "train.jsonl"))
    with pytest.raises(DataError, match=r"missing\.parquet: no such file"):
        D.load_pairs(str(tmp_path / "missing.parquet"))
    with pytest.raises(DataError, match="no file matches"):
        D.load_pairs(str(tmp_path / "*.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no preference pairs left"):
        D.load_pairs(str(empty))
    # a required column absent from the whole file: an error even when bad rows are skipped
    path = write(tmp_path / "nochosen.jsonl", [{"input": "x", "rejected": "y"}])
    with pytest.raises(DataError, match=r"nochosen\.jsonl, row 1, column 'chosen': missing from the file"):
        D.load_pairs(path, schema="themis", on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row"):
        D.load_pairs(path, on_bad_row="ignore")
    with pytest.raises(ValueError, match="schema"):
        D.load_pairs(path, schema="hf")


# ============================================================================================ criteria prompts
def _aspect_pairs(n: int) -> list[D.PreferencePair]:
    return [D.PreferencePair(prompt="p", chosen="a", rejected="b", aspect=CRITERIA[i % 5]) for i in range(n)]


def test_assign_system_prompts_proportions_and_determinism():
    pairs = _aspect_pairs(10_000)
    out = D.assign_system_prompts(pairs, "scalar", CRITERIA, CriteriaPrompts(), seed=3)
    kinds = Counter("none" if s is None else "all" if s == ALL_CRITERIA_PROMPT else "own" for s in out)
    assert abs(kinds["none"] / 1e4 - 0.15) < 0.02
    assert abs(kinds["all"] / 1e4 - 0.20) < 0.02
    assert abs(kinds["own"] / 1e4 - 0.65) < 0.02
    for p, s in zip(pairs, out):  # "own" is the pair's own criterion
        assert s in (None, ALL_CRITERIA_PROMPT, CRITERION_PROMPTS[p.aspect])
    assert out == D.assign_system_prompts(pairs, "scalar", CRITERIA, CriteriaPrompts(), seed=3)
    assert out != D.assign_system_prompts(pairs, "scalar", CRITERIA, CriteriaPrompts(), seed=4)
    # pair i's draw depends only on (seed, i)
    assert out[:100] == D.assign_system_prompts(pairs[:100], "scalar", CRITERIA, None, seed=3)
    other = D.assign_system_prompts(pairs, "scalar", CRITERIA, None, proportions=(0.5, 0.5, 0.0), seed=3)
    assert CRITERION_PROMPTS[CRITERIA[0]] not in other


def test_assign_system_prompts_no_aspect_data_system_and_modes():
    pairs = [D.PreferencePair(prompt="p", chosen="a", rejected="b") for _ in range(7000)]
    out = D.assign_system_prompts(pairs, "scalar", CRITERIA, None, seed=0)
    share_none = sum(s is None for s in out) / len(out)
    assert set(out) == {None, ALL_CRITERIA_PROMPT} and abs(share_none - 0.15 / 0.35) < 0.03
    with_sys = [D.PreferencePair(prompt="p", chosen="a", rejected="b", system="House rules.",
                                 aspect="Security_Hardness")] * 200
    out = D.assign_system_prompts(with_sys, "scalar", CRITERIA, None, seed=0)
    assert "House rules." in out  # no criteria prompt: the data's own
    assert f"{CRITERION_PROMPTS['Security_Hardness']}\n\nHouse rules." in out
    assert f"{ALL_CRITERIA_PROMPT}\n\nHouse rules." in out
    assert D.assign_system_prompts(with_sys, "criteria", CRITERIA, None) == ["House rules."] * 200
    with pytest.raises(ValueError, match="summing to 1"):
        D.assign_system_prompts(with_sys, "scalar", CRITERIA, None, proportions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="no criteria prompt for Security_Hardness"):
        D.assign_system_prompts(with_sys, "scalar", CRITERIA, CriteriaPrompts({"Functional_Correctness": "x"}))
    with pytest.raises(ValueError, match="not among the run's criteria"):
        D.assign_system_prompts(with_sys, "scalar", ["Functional_Correctness"], None)
    with pytest.raises(ValueError, match="mode"):
        D.assign_system_prompts(with_sys, "multi", CRITERIA, None)


# ============================================================================================ tokenization
def _pairs_for_tokenizing() -> list[D.PreferencePair]:
    return [
        D.PreferencePair(prompt="Sum a list.", chosen="def f(xs): return sum(xs)", rejected="def f(xs): return 0",
                         aspect="Functional_Correctness", language="Python", margin=1.5),
        D.PreferencePair(prompt="Escape input.", chosen="q = ?", rejected="q = ' + x", system="Be strict.",
                         aspect="Security_Hardness", language="Go"),
        D.PreferencePair(prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"},
                                 {"role": "user", "content": "sort"}], chosen="xs.sort()", rejected="bubble(xs)"),
        D.PreferencePair(prompt=[], chosen="e", rejected="f"),  # a one-letter answer also in '<|im_end|>'
        D.PreferencePair(prompt="p", rejected="three", chosen=[{"role": "assistant", "content": "one"},
                                                               {"role": "user", "content": "more"},
                                                               {"role": "assistant", "content": "two"}]),
    ]


def test_tokenize_equals_scorer_templating(tok):
    pairs = _pairs_for_tokenizing()
    systems = [None, "Crit prompt.\n\nBe strict.", "S", None, None]
    out, stats = D.tokenize_pairs(pairs, tok, 512, systems, CRITERIA)
    scorer = Scorer(_StubModel(), tok, max_length=512)
    assert stats["kept"] == 5 and stats["truncated"] == 0 and stats["cache"] == "off"
    for t, p, s in zip(out, pairs, systems):
        conv_c, conv_r = D.conversations(p, s)
        assert t.chosen_ids == scorer.tokenize([conv_c])[0]
        assert t.rejected_ids == scorer.tokenize([conv_r])[0]
        # the answer starts at chosen_response_start: before it, the templated conversation up to
        # the last answer message's content; from it, that content and the closing tokens
        answer = conv_c[-1]["content"]
        assert tok.decode(t.chosen_ids[t.chosen_response_start:]) == answer + "<|im_end|>\n"
        assert tok.decode(t.rejected_ids[t.rejected_response_start:]) == conv_r[-1]["content"] + "<|im_end|>\n"
        assert tok.decode(t.chosen_ids[:t.chosen_response_start]).endswith("<|im_start|>assistant\n")
    assert [t.aspect_index for t in out] == [0, 4, -1, -1, -1]
    assert [t.margin for t in out] == [1.5, 0.0, 0.0, 0.0, 0.0]
    assert [t.language for t in out] == ["Python", "Go", None, None, None]
    assert [t.index for t in out] == list(range(5))
    # None: each pair's own system
    own, _ = D.tokenize_pairs(pairs[1:2], tok, 512, None, CRITERIA)
    assert own[0].chosen_ids == scorer.tokenize([D.conversations(pairs[1], "Be strict.")[0]])[0]


def test_truncation_keeps_closing_tokens_like_scorer(tok):
    long_c = " ".join(f"word{i}" for i in range(200))
    long_r = " ".join(f"other{i}" for i in range(200))
    pairs = [D.PreferencePair(prompt="short prompt", chosen=long_c, rejected=long_r, aspect="Security_Hardness"),
             D.PreferencePair(prompt="short prompt", chosen="fine", rejected="also fine")]
    out, stats = D.tokenize_pairs(pairs, tok, 40, None, CRITERIA)
    scorer = Scorer(_StubModel(), tok, max_length=40)
    closing = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    t = out[0]
    assert t.truncated and not out[1].truncated and stats["truncated"] == 1
    assert len(t.chosen_ids) == 40 and len(t.rejected_ids) == 40
    assert t.chosen_ids[-len(closing):] == closing and t.rejected_ids[-len(closing):] == closing
    c, r = D.conversations(pairs[0])
    assert t.chosen_ids == scorer.tokenize([c])[0] and t.rejected_ids == scorer.tokenize([r])[0]
    assert tok.decode(t.chosen_ids[t.chosen_response_start:]).startswith("word0 word1")

    skipped, stats = D.tokenize_pairs(pairs, tok, 40, None, CRITERIA, on_overflow="skip")
    assert [x.index for x in skipped] == [1] and stats["skipped_overflow"] == 1
    with pytest.raises(DataError, match=r"pair 0 \(chosen\): \d+ tokens, over max_length=40"):
        D.tokenize_pairs(pairs, tok, 40, None, CRITERIA, on_overflow="error")
    too_long = [D.PreferencePair(prompt=long_c, chosen="a", rejected="b", source="f.jsonl:row 9")]
    with pytest.raises(DataError, match=r"f\.jsonl:row 9 \(chosen\): the prompt alone is \d+ tokens"):
        D.tokenize_pairs(too_long, tok, 40, None, CRITERIA)


def test_identical_after_truncation_is_dropped(tok):
    same_start = " ".join(f"w{i}" for i in range(100))
    pairs = [D.PreferencePair(prompt="p", chosen=same_start + " good", rejected=same_start + " bad"),
             D.PreferencePair(prompt="p", chosen="x", rejected="y")]
    out, stats = D.tokenize_pairs(pairs, tok, 30, None, CRITERIA)
    assert [t.index for t in out] == [1] and stats["skipped_identical"] == 1 and stats["truncated"] == 0


def test_tokenize_rejects_unknown_aspect(tok):
    pairs = [D.PreferencePair(prompt="p", chosen="x", rejected="y", aspect="Speed", source="a.jsonl:row 3")]
    with pytest.raises(DataError, match=r"a\.jsonl:row 3: aspect 'Speed' is not among the run's criteria"):
        D.tokenize_pairs(pairs, tok, 64, None, CRITERIA)


def test_cache_hit_equals_miss_and_skips_tokenizing(tok, tmp_path, monkeypatch):
    pairs = _pairs_for_tokenizing() * 40
    systems = D.assign_system_prompts(pairs, "scalar", CRITERIA, None, seed=1)
    t0 = time.perf_counter()
    miss, s1 = D.tokenize_pairs(pairs, tok, 256, systems, CRITERIA, cache_dir=tmp_path / "cache")
    t_miss = time.perf_counter() - t0
    assert s1["cache"] == "miss" and Path(s1["cache_file"]).is_file()

    def boom(*a, **k):
        raise AssertionError("tokenized on a cache hit")

    monkeypatch.setattr(tok, "apply_chat_template", boom)
    t0 = time.perf_counter()
    hit, s2 = D.tokenize_pairs(pairs, tok, 256, systems, CRITERIA, cache_dir=tmp_path / "cache")
    t_hit = time.perf_counter() - t0
    assert s2["cache"] == "hit" and s2["cache_file"] == s1["cache_file"]
    assert hit == miss
    assert {k: s2[k] for k in ("kept", "truncated", "tokens")} == {k: s1[k] for k in ("kept", "truncated", "tokens")}
    assert t_hit < t_miss
    # another setting is another key (the patched tokenizer proves it tokenizes again)
    with pytest.raises(DataError, match="tokenized on a cache hit"):
        D.tokenize_pairs(pairs, tok, 257, systems, CRITERIA, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="tokenized on a cache hit"):
        D.tokenize_pairs(pairs, tok, 256, None, CRITERIA, cache_dir=tmp_path / "cache")
    changed = list(pairs)
    changed[7] = D.PreferencePair(prompt="changed", chosen="x", rejected="y")
    with pytest.raises(DataError, match="tokenized on a cache hit"):
        D.tokenize_pairs(changed, tok, 256, systems, CRITERIA, cache_dir=tmp_path / "cache")


def test_cache_key_follows_the_tokenizer(tok, tmp_path):
    other = build_tokenizer(tmp_path / "other", corpus=["completely different words " * 20] * 10, vocab_size=300)
    assert D.tokenizer_fingerprint(tok) != D.tokenizer_fingerprint(other)
    pairs = _pairs_for_tokenizing()
    _, a = D.tokenize_pairs(pairs, tok, 64, None, CRITERIA, cache_dir=tmp_path)
    _, b = D.tokenize_pairs(pairs, other, 64, None, CRITERIA, cache_dir=tmp_path)
    assert a["cache_file"] != b["cache_file"] and b["cache"] == "miss"
    # a damaged cache file is replaced, not trusted
    Path(a["cache_file"]).write_bytes(b"not an npz")
    again, c = D.tokenize_pairs(pairs, tok, 64, None, CRITERIA, cache_dir=tmp_path)
    assert c["cache"] == "miss" and json.dumps(c["kept"]) == "5"


def test_no_criteria_means_no_aspect_index(tok):
    pairs = [D.PreferencePair(prompt="p", chosen="x", rejected="y", aspect="Anything")]
    (t,), _ = D.tokenize_pairs(pairs, tok, 64)
    assert t.aspect_index == -1
