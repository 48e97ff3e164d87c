"""A synthetic workload shaped like CodeRewardBench, in token ids (seeded; no download).

Each pair is a group: system prompt (the aspect's criterion prompt) + user prompt, then a chosen and
a rejected response. The mix follows CRB's published composition (aspects, languages); about half of
CRB's subsets are commit-based, whose two responses are two versions of one file and share a long
common opening. Lengths are log-normal, capped so each standalone sequence fits max_length.
The ids are random (a benchmark needs the lengths and the sharing, not the words).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# CodeRewardBench composition (../shared/data/README.md)
ASPECT_COUNTS = {
    "Functional_Correctness": 4778,
    "Readability_Maintainability": 1499,
    "Runtime_Efficiency": 1309,
    "Security_Hardness": 991,
    "Memory_Efficiency": 289,
}
LANGUAGE_COUNTS = {
    "Python": 2566, "Cpp": 1471, "Java": 1467, "JavaScript": 1084,
    "Ruby": 925, "Go": 726, "C": 439, "CSharp": 188,
}
# chat-template overhead in tokens: <|im_start|>system\n ... <|im_end|>\n etc.
TEMPLATE_OPEN = 3
TEMPLATE_CLOSE = 2


@dataclass
class PairWorkload:
    """prefix_ids[i]: the prompt part shared by both responses of pair i (system + user + the
    assistant header); chosen_ids[i] / rejected_ids[i]: the response tokens (closing included).
    The standalone sequences are prefix + chosen and prefix + rejected."""

    prefix_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    aspects: list[str]
    languages: list[str]
    commit_style: list[bool]

    def __len__(self) -> int:
        return len(self.prefix_ids)

    def sequences(self) -> list[list[int]]:
        """Standalone sequences in evaluation order: chosen 0, rejected 0, chosen 1, ..."""
        out = []
        for p, c, r in zip(self.prefix_ids, self.chosen_ids, self.rejected_ids):
            out.append(p + c)
            out.append(p + r)
        return out

    def standalone_tokens(self) -> int:
        return sum(len(s) for s in self.sequences())

    def padded_tokens(self, batch_size: int) -> int:
        """Tokens a right-padded baseline computes: batches of `batch_size` sequences in order."""
        lengths = [len(s) for s in self.sequences()]
        return sum(len(lengths[i : i + batch_size]) * max(lengths[i : i + batch_size])
                   for i in range(0, len(lengths), batch_size))

    def unique_tokens(self) -> int:
        """Tokens the engine computes: each pair's longest common prefix once."""
        from themis_engine.packing.planner import shared_prefix_len

        total = 0
        for p, c, r in zip(self.prefix_ids, self.chosen_ids, self.rejected_ids):
            a, b = p + c, p + r
            n = shared_prefix_len([a, b])
            total += len(a) + len(b) - n
        return total


def _lognormal(rng, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))


def crb_like_pairs(
    num_pairs: int,
    vocab_size: int,
    max_length: int = 4096,
    seed: int = 0,
    commit_fraction: float = 0.5,
) -> PairWorkload:
    """`num_pairs` CRB-shaped pairs of random token ids below vocab_size (ids 0..9 are avoided so a
    pad id never occurs inside a sequence)."""
    rng = np.random.default_rng(seed)
    aspects = list(ASPECT_COUNTS)
    a_p = np.array([ASPECT_COUNTS[a] for a in aspects], dtype=float)
    langs = list(LANGUAGE_COUNTS)
    l_p = np.array([LANGUAGE_COUNTS[x] for x in langs], dtype=float)
    # one fixed criterion prompt per aspect, as a trained RM would see
    system = {a: rng.integers(10, vocab_size, size=_lognormal(rng, 60, 0.3, 30, 120)).tolist() for a in aspects}
    out = PairWorkload([], [], [], [], [], [])
    for _ in range(num_pairs):
        aspect = aspects[rng.choice(len(aspects), p=a_p / a_p.sum())]
        lang = langs[rng.choice(len(langs), p=l_p / l_p.sum())]
        user = rng.integers(10, vocab_size, size=_lognormal(rng, 220, 0.8, 16, max_length // 3)).tolist()
        prefix = [1] * TEMPLATE_OPEN + system[aspect] + [1] * TEMPLATE_OPEN + user + [1] * TEMPLATE_OPEN
        room = max_length - len(prefix) - TEMPLATE_CLOSE
        commit = bool(rng.random() < commit_fraction)
        if commit:
            body = _lognormal(rng, 900, 0.6, 32, room)
            common = rng.integers(10, vocab_size, size=int(body * rng.uniform(0.5, 0.95))).tolist()
            tail_c = _lognormal(rng, 80, 0.8, 1, max(1, room - len(common)))
            tail_r = _lognormal(rng, 80, 0.8, 1, max(1, room - len(common)))
            chosen = common + rng.integers(10, vocab_size, size=tail_c).tolist()
            rejected = common + rng.integers(10, vocab_size, size=tail_r).tolist()
        else:
            chosen = rng.integers(10, vocab_size, size=_lognormal(rng, 500, 0.8, 8, room)).tolist()
            rejected = rng.integers(10, vocab_size, size=_lognormal(rng, 500, 0.8, 8, room)).tolist()
        out.prefix_ids.append(prefix)
        out.chosen_ids.append(chosen + [2] * TEMPLATE_CLOSE)
        out.rejected_ids.append(rejected + [2] * TEMPLATE_CLOSE)
        out.aspects.append(aspect)
        out.languages.append(lang)
        out.commit_style.append(commit)
    return out
