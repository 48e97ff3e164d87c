"""The engine's scores equal transformers' on the same checkpoint, and prefix sharing is exact."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import conversation, hf_scores, make_checkpoint, random_text
from transformers import AutoModelForSequenceClassification

import themis_engine as te

FAMILIES = [
    # (family, num_labels, num_heads, num_kv_heads, extra config)
    ("qwen3", 1, 4, 4, {}),
    ("qwen3", 5, 8, 2, {}),
    ("qwen2", 1, 4, 1, {}),
    ("qwen2", 5, 4, 4, {}),
    ("llama", 1, 4, 4, {}),
    ("llama", 5, 8, 2, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("qwen3", 3, 4, 1, {"tie_word_embeddings": True}),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


def _conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [
        conversation(random_text(rng, 1, 20), random_text(rng, 1, 60), random_text(rng, 2, 8) if i % 3 == 0 else None)
        for i in range(n)
    ]


@pytest.mark.parametrize("family,num_labels,heads,kv_heads,extra", FAMILIES)
def test_score_matches_transformers(root, family, num_labels, heads, kv_heads, extra):
    head_dim = 16
    name = f"{family}-{num_labels}-{heads}-{kv_heads}-{len(extra)}"
    ckpt = make_checkpoint(
        root, name, family=family, num_labels=num_labels, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, hidden_size=heads * head_dim if family == "qwen2" else 64, **extra,
    )
    scorer = te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_tokens_per_batch=700)
    convs = _conversations(9, seed=hash(name) % 1000)
    ours = scorer.score(convs)
    assert ours.dtype == torch.float32 and ours.shape == (9, num_labels)
    assert scorer.last_report.micro_batches > 1  # several sequences per micro-batch, several batches
    ids = [scorer.tokenize([c])[0] for c in convs]
    ref = hf_scores(ckpt, ids)
    assert (ours - ref).abs().max().item() < 1e-4, (ours - ref).abs().max()
    assert ref.std() > 1e-2  # the scores are not trivially equal


def test_hf_padded_batch_matches(root):
    """transformers on a right-padded batch (how evaluation scripts run it) agrees too."""
    ckpt = make_checkpoint(root, "padded", family="qwen3", num_labels=5, num_heads=4, num_kv_heads=2)
    scorer = te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    convs = _conversations(6, seed=3)
    ours = scorer.score(convs)
    tok = scorer.tokenizer
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    tok.padding_side = "right"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(**enc).logits
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def sharing_scorer(root):
    ckpt = make_checkpoint(root, "sharing", family="qwen3", num_labels=5, num_heads=8, num_kv_heads=2)
    return te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_tokens_per_batch=1024)


def test_score_pairs_equals_standalone(sharing_scorer):
    rng = random.Random(7)
    n = 7
    prompts = [random_text(rng, 3, 30) for _ in range(n)]
    # commit-style pairs: the two responses share a long opening
    chosen, rejected = [], []
    for i in range(n):
        common = random_text(rng, 0, 40)
        chosen.append(common + " " + random_text(rng, 1, 10))
        rejected.append(common + " " + random_text(rng, 1, 10))
    system = [None if i % 2 else random_text(rng, 2, 6) for i in range(n)]
    c, r = sharing_scorer.score_pairs(prompts, chosen, rejected, system=system)
    assert sharing_scorer.last_report.tokens_computed < sharing_scorer.last_report.tokens_standalone
    alone = sharing_scorer.score(
        [conversation(p, x, s) for p, x, s in zip(prompts, chosen, system)]
        + [conversation(p, x, s) for p, x, s in zip(prompts, rejected, system)]
    )
    assert (c - alone[:n]).abs().max().item() < 1e-5
    assert (r - alone[n:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_score_groups_equals_standalone(sharing_scorer, k):
    rng = random.Random(k)
    prompts = [random_text(rng, 5, 25) for _ in range(3)]
    completions = [[random_text(rng, 1, 12) for _ in range(k)] for _ in prompts]
    completions[0][0] = completions[0][-1]  # identical responses in one group are fine
    out = sharing_scorer.score_groups(prompts, completions, system="judge the code")
    assert [t.shape for t in out] == [(k, 5)] * 3
    flat = [conversation(p, x, "judge the code") for p, xs in zip(prompts, completions) for x in xs]
    alone = sharing_scorer.score(flat)
    assert (torch.cat(out) - alone).abs().max().item() < 1e-5


def test_score_token_groups_equals_score(sharing_scorer):
    rng = random.Random(11)
    convs = [conversation("same prompt here", random_text(rng, 1, 15)) for _ in range(4)]
    ids = [sharing_scorer.tokenize([c])[0] for c in convs]
    prefix = ids[0][:5]
    out = sharing_scorer.score_token_groups([prefix], [[x[5:] for x in ids]])
    assert (out[0] - sharing_scorer.score(convs)).abs().max().item() < 1e-5


def test_results_do_not_depend_on_budget(sharing_scorer, root):
    rng = random.Random(5)
    prompts = [random_text(rng, 3, 30) for _ in range(6)]
    chosen = [random_text(rng, 1, 30) for _ in range(6)]
    rejected = [random_text(rng, 1, 30) for _ in range(6)]
    base = sharing_scorer.score_pairs(prompts, chosen, rejected)
    small = te.Scorer(sharing_scorer.model, sharing_scorer.tokenizer, max_tokens_per_batch=300)
    other = small.score_pairs(prompts, chosen, rejected)
    assert small.last_report.micro_batches > sharing_scorer.last_report.micro_batches
    for a, b in zip(base, other):
        assert (a - b).abs().max().item() < 1e-5
