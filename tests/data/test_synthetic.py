"""The demo's synthetic code-preference set: seeded, every criterion x language, short answers that
differ, a stratified split, a small tokenizer, and files the real loader reads."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from themis_engine import data as D
from themis_engine.data import synthetic as S
from themis_engine.data.tables import write_jsonl
from themis_engine.model.args import DEFAULT_CRITERIA


@pytest.fixture(scope="module")
def pairs():
    return S.make_demo_pairs(400, seed=11)


def test_seeded_and_deterministic(pairs):
    assert S.make_demo_pairs(400, seed=11) == pairs
    other = S.make_demo_pairs(400, seed=12)
    assert sum(a.chosen == b.chosen for a, b in zip(pairs, other)) < 20
    assert S.make_demo_pairs(37, seed=11) == S.make_demo_pairs(37, seed=11) and len(S.make_demo_pairs(37, 0)) == 37


def test_covers_every_criterion_and_language(pairs):
    cells = Counter((p.aspect, p.language) for p in pairs)
    assert set(S.CRITERIA) == set(DEFAULT_CRITERIA)
    assert set(cells) == {(a, lang) for a in S.CRITERIA for lang in S.LANGUAGES}
    assert min(cells.values()) >= 400 // 40 - 1  # balanced cycling over the 40 cells
    families = Counter(p.subset for p in pairs)
    assert set(families) == {name for fams in S.FAMILIES.values() for name, _ in fams}


def test_pairs_are_well_formed_and_not_repeated(pairs):
    for p in pairs:
        assert isinstance(p.prompt, str) and p.prompt.strip()
        assert isinstance(p.chosen, str) and isinstance(p.rejected, str)
        assert p.chosen != p.rejected and p.chosen.strip() and p.rejected.strip()
        assert p.aspect in S.CRITERIA and p.language in S.LANGUAGES and p.id.startswith("demo-11-")
        assert "\x01" not in p.chosen + p.rejected  # indentation placeholders all rendered
    # identifiers, constants and wording are drawn per row: (almost) no two rows alike
    assert len({p.chosen for p in pairs}) > 0.9 * len(pairs)
    assert len({p.prompt for p in pairs}) > 0.9 * len(pairs)


def test_every_family_renders_in_every_language():
    r = random.Random(0)
    for aspect, families in S.FAMILIES.items():
        for name, family in families:
            for lang in S.LANGUAGES:
                for _ in range(8):
                    pair = S._make_pair(random.Random(r.random()), aspect, lang, "x")
                    assert pair is not None and pair.chosen != pair.rejected, (aspect, name, lang)


def test_answers_are_short_with_the_demo_tokenizer(pairs, tmp_path):
    tok = S.build_demo_tokenizer(pairs, tmp_path / "tok", vocab_size=1024)
    assert len(tok) <= 1024 and (tmp_path / "tok" / "tokenizer.json").is_file()
    out, stats = D.tokenize_pairs(pairs, tok, 1024, None, list(S.CRITERIA))
    assert stats["kept"] == len(pairs) and stats["truncated"] == 0
    answer = np.array([len(t.chosen_ids) - t.chosen_response_start for t in out]
                      + [len(t.rejected_ids) - t.rejected_response_start for t in out])
    assert 30 <= np.median(answer) <= 120 and answer.max() < 260 and answer.min() >= 10
    # the criteria prompts are in the tokenizer's corpus, so they stay compact
    from themis_engine.data.prompts import ALL_CRITERIA_PROMPT

    assert len(tok(ALL_CRITERIA_PROMPT)["input_ids"]) < 60


def test_split_is_stratified_disjoint_and_seeded(pairs):
    train, held = S.split_pairs(pairs, 0.2, seed=3)
    assert len(train) + len(held) == len(pairs)
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert abs(len(held) - 0.2 * len(pairs)) <= 1
    assert set(Counter((p.aspect, p.language) for p in held).values()) == {2}  # 10 per cell x 0.2
    assert {(p.aspect, p.language) for p in held} == {(p.aspect, p.language) for p in pairs}
    assert S.split_pairs(pairs, 0.2, seed=3) == (train, held)
    assert S.split_pairs(pairs, 0.2, seed=4)[1] != held
    order = [p.id for p in pairs]
    assert [p.id for p in held] == [i for i in order if i in {p.id for p in held}]  # input order kept
    with pytest.raises(ValueError):
        S.split_pairs(pairs, 1.0)
    for n, frac in ((48, 0.25), (37, 0.1), (5, 0.5)):  # small sets keep the fraction too
        few = S.make_demo_pairs(n, seed=0)
        assert abs(len(S.split_pairs(few, frac, seed=1)[1]) - frac * n) <= 1
    assert S.split_pairs(pairs, 0.0) == (list(pairs), [])


def test_demo_set_loads_through_the_real_loader(pairs, tmp_path):
    path = tmp_path / "demo.jsonl"
    write_jsonl(D.pairs_to_rows(pairs, "crb"), path)
    loaded, report = D.load_pairs(str(path), criteria=list(S.CRITERIA))
    assert report.schemas[str(path)] == "crb" and report.kept == len(pairs)
    assert [(p.prompt, p.chosen, p.rejected, p.aspect, p.language, p.subset, p.id) for p in loaded] == \
        [(p.prompt, p.chosen, p.rejected, p.aspect, p.language, p.subset, p.id) for p in pairs]


def test_subsets_of_criteria_and_languages():
    few = S.make_demo_pairs(30, seed=0, criteria=["Security_Hardness"], languages=["C", "Go"])
    assert {p.aspect for p in few} == {"Security_Hardness"} and {p.language for p in few} == {"C", "Go"}
    with pytest.raises(ValueError, match="no synthetic family"):
        S.make_demo_pairs(5, criteria=["Style"])
    with pytest.raises(ValueError, match="unknown languages"):
        S.make_demo_pairs(5, languages=["Rust"])
