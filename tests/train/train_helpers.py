"""Building blocks of the trainer's tests: token-level preference pairs and a tiny objective."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from themis_engine.model.args import ModelArgs
from themis_engine.model.decoder import RewardModel
from themis_engine.train.objective import RewardObjective


def token_pairs(n: int, seed: int = 0, vocab: int = 97, shared_answer: bool = False, margins=None, languages=None):
    """n pairs of token ids sharing a random prompt (the TokenizedPair fields the trainer reads).
    shared_answer: every other pair's answers also share a common start; margins / languages: drawn
    from these lists (default 0.0 / "Python")."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        common = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 6))] if shared_answer and i % 2 else []
        c = prompt + common + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 8))]
        r = prompt + common + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 8))]
        aspect = rng.choice([-1, 0, 1, 2])
        margin = rng.choice(margins) if margins else 0.0
        language = rng.choice(languages) if languages else "Python"
        out.append(SimpleNamespace(chosen_ids=c, rejected_ids=r, chosen_response_start=len(prompt),
                                   chosen_target_end=-1, aspect_index=aspect, margin=margin, language=language))
    return out


def tiny_objective(lm_coef: float = 0.3, mu: float = 0.05, seed: int = 0) -> RewardObjective:
    """A 2-block Qwen3 RewardModel (3 heads, vocab 97, LM head) in the training objective, float32,
    with weights drawn wide enough that a wrong op shows."""
    torch.manual_seed(seed)
    args = ModelArgs(family="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, criteria=("a", "b", "c"))
    rm = RewardModel(args, with_lm_head=True)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return RewardObjective(rm, lm_coef, mu, "centering")
