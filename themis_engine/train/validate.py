"""The held-out evaluation of a training run: pairwise accuracy per criterion and per language (the
evaluator's by_aspect / by_language grouping, in eval/results.py) and the reward mean / std of
every head.

    validator = Validator(objective, criteria, aspects, max_tokens_per_batch=8192, device=device)
    metrics = validator(eval_pairs)    # {"eval/accuracy": ..., "eval/accuracy/<criterion>": ..., ...}
    validator.reward_stats             # {head: {"mean", "std"}}, written into the export's config

A pair is right for a head when its chosen reward is strictly greater than its rejected one (a tie
is wrong), as in CodeRewardBench. Criteria mode: a pair counts for its own aspect's head (every head
when it has none). Scalar mode (one head): it counts under its aspect's name ("unlabelled" when it
has none). Under torchrun every rank scores a disjoint share and the counts and sums are added up.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from themis_engine import distributed
from themis_engine.eval.results import grouped_accuracy
from themis_engine.train import microbatch

UNLABELLED = "unlabelled"


def accuracy_cells(pair, num_heads: int, num_names: int) -> list[tuple[int, int]]:
    """(head, accuracy group) cells a pair counts in: its aspect's head in criteria mode (every head
    when it has no aspect); the one head under its aspect's group (the last, "unlabelled", when
    none) in scalar mode."""
    if num_heads > 1:
        return [(h, h) for h in ([pair.aspect_index] if pair.aspect_index >= 0 else range(num_heads))]
    return [(0, pair.aspect_index if pair.aspect_index >= 0 else num_names - 1)]


def reward_stats(sums: Sequence[float], squares: Sequence[float], counts: Sequence[float],
                 heads: Sequence[str]) -> dict[str, dict[str, float]]:
    """{head: {"mean", "std"}} from the sums of the rewards and of their squares (population std)."""
    out = {}
    for h, name in enumerate(heads):
        n = counts[h]
        mean = sums[h] / n
        out[name] = {"mean": mean, "std": math.sqrt(max(0.0, squares[h] / n - mean * mean))}
    return out


class Validator:
    """Scores held-out pairs with the training objective's reward model and reports accuracy.

    objective: the (possibly FSDP-sharded) RewardObjective; criteria: the head names; aspects: the
    criteria the pairs' aspect_index points into (== criteria in criteria mode); device: where the
    micro-batches go; rank / world: this process's share of the pairs; every: evaluate every N steps
    during training (0 = at the end only)."""

    def __init__(self, objective, criteria: Sequence[str], aspects: Sequence[str], *, max_tokens_per_batch: int,
                 device, rank: int = 0, world: int = 1, every: int = 0):
        self.objective = objective
        self.criteria = list(criteria)
        self.aspects = list(aspects)
        self.budget = max_tokens_per_batch
        self.device = device
        self.rank, self.world = rank, world
        self.every = int(every)
        self.reward_stats: dict[str, dict[str, float]] = {}

    def due(self, step: int, total_steps: int) -> bool:
        """An evaluation during training after step `step` (the final one is run by the caller)."""
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def group_names(self) -> list[str]:
        """The accuracy groups: the heads in criteria mode; the aspects and "unlabelled" with one head."""
        return list(self.criteria) if len(self.criteria) > 1 else self.aspects + [UNLABELLED]

    def _rewards(self, pairs) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """(pair indices, chosen rewards [n, H], rejected rewards [n, H]) float64 on the host, per
        micro-batch of this rank's share. A rank with fewer micro-batches runs padding ones (not
        yielded) so that FSDP's collectives stay in step."""
        H = len(self.criteria)
        mine = list(range(len(pairs)))[self.rank :: self.world]
        mbs = microbatch.build_micro_batches(pairs, mine, self.budget, H, False)
        n_mb = distributed.all_reduce_max_int(len(mbs), self.device)
        for k in range(n_mb):
            real = k < len(mbs)
            if real:
                mb = mbs[k]
            else:  # keep the collectives in step with ranks that have more micro-batches
                mb = mbs[0] if mbs else microbatch.build_micro_batches(pairs, [0], 1 << 30, H, False)[0]
            inputs = mb.to_torch(self.device)
            inputs["mask"] = torch.ones_like(inputs["mask"])
            _, bt, _ = self.objective(**inputs, bt_normalizer=1.0, lm_normalizer=1.0)
            if real:
                yield mb.pair_ids.tolist(), bt.reward_chosen.double().cpu(), bt.reward_rejected.double().cpu()

    @torch.no_grad()
    def __call__(self, pairs) -> dict:
        """The eval/* metrics of `pairs` (tokenized pairs with aspect_index and language); sets
        `reward_stats`. Every rank calls it (collectives); an empty list gives {}."""
        if not pairs:
            return {}
        H = len(self.criteria)
        names = self.group_names()
        langs = sorted({p.language or "unknown" for p in pairs})
        C, Lg = len(names), len(langs)
        # host float64: [count, win] per criterion group, per language, then per head: sum, square sum, n
        acc = torch.zeros(2 * C + 2 * Lg + 3 * H, dtype=torch.float64)
        was_training = self.objective.training
        self.objective.eval()
        try:
            for pair_ids, rc, rr in self._rewards(pairs):
                for row, i in enumerate(pair_ids):
                    p = pairs[i]
                    li = 2 * C + 2 * langs.index(p.language or "unknown")
                    for h, c in accuracy_cells(p, H, C):
                        win = float(rc[row, h] > rr[row, h])
                        acc[c] += 1
                        acc[C + c] += win
                        acc[li] += 1
                        acc[li + 1] += win
                base = 2 * C + 2 * Lg
                both = torch.cat([rc, rr])
                acc[base : base + H] += both.sum(0)
                acc[base + H : base + 2 * H] += both.pow(2).sum(0)
                acc[base + 2 * H : base + 3 * H] += both.shape[0]
        finally:
            if was_training:
                self.objective.train()
        a = distributed.all_reduce_sum(acc.to(self.device)).cpu().tolist()
        total = sum(a[:C])
        out = {"eval/accuracy": sum(a[C : 2 * C]) / total if total else float("nan")}
        for name, value in grouped_accuracy(a[:C], a[C : 2 * C], names).items():
            out[f"eval/accuracy/{name}"] = value
        by_language = grouped_accuracy(a[2 * C : 2 * C + 2 * Lg : 2], a[2 * C + 1 : 2 * C + 2 * Lg : 2], langs)
        for lang, value in by_language.items():
            out[f"eval/accuracy_language/{lang}"] = value
        base = 2 * C + 2 * Lg
        self.reward_stats = reward_stats(a[base : base + H], a[base + H : base + 2 * H],
                                         a[base + 2 * H : base + 3 * H], self.criteria)
        for name, s in self.reward_stats.items():
            out[f"eval/reward_mean/{name}"] = s["mean"]
            out[f"eval/reward_std/{name}"] = s["std"]
        return out

