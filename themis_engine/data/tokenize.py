"""Preference pairs -> token ids, the way the Scorer computes them, cached on disk.

`tokenize_pairs(pairs, tokenizer, max_length, system_prompts, criteria)` turns each side into ids
through the one chat path (themis_engine.chat.encode, as `Scorer` does): rendered with the
tokenizer's chat template, over-long answers cut from the right keeping the template's closing
tokens, the answer's span and LM targets found in token space; the result is cached on disk keyed
by the data, the tokenizer and the settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from themis_engine import chat
from themis_engine.data.schemas import Message, PreferencePair
from themis_engine.errors import DataError
from themis_engine.fileio import atomic_write

logger = logging.getLogger("themis_engine")

OVERFLOW_POLICIES = chat.OVERFLOW_POLICIES
_CACHE_VERSION = 2  # 2: spans from the chat path (token-space probes), chosen_target_end


@dataclass
class TokenizedPair:
    """A pair as token ids: each side is the full templated standalone sequence
    (system + prompt + answer + the template's closing tokens). The packer shares their longest
    common prefix. `chosen_response_start`: index in chosen_ids of the first token the chat template
    emits for the chosen answer (of its last assistant message; themis_engine.chat), the start of
    the LM-loss labels; `chosen_target_end`: the end (exclusive) of those labels, the answer and the
    end-of-turn token (chat.Encoded.targets); likewise `rejected_response_start`. `aspect_index`:
    the pair's criterion in the run's criteria, -1 if none. `index`: the pair's position in the
    list given to tokenize_pairs."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_response_start: int
    aspect_index: int
    margin: float
    language: str | None
    truncated: bool
    rejected_response_start: int = 0
    index: int = 0
    chosen_target_end: int = -1  # -1: to the end of chosen_ids



# ============================================================================================ tokenization
def conversations(pair: PreferencePair, system: str | None = None) -> tuple[list[Message], list[Message]]:
    """(chosen conversation, rejected conversation): [system] + prompt turns + answer turns, the
    way Scorer builds them (a text prompt is a user turn, a text answer an assistant turn)."""
    base: list[Message] = [{"role": "system", "content": system}] if system is not None else []
    if isinstance(pair.prompt, str):
        base.append({"role": "user", "content": pair.prompt})
    else:
        base.extend(dict(m) for m in pair.prompt)

    def answer(a):
        return [{"role": "assistant", "content": a}] if isinstance(a, str) else [dict(m) for m in a]

    return base + answer(pair.chosen), base + answer(pair.rejected)


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    system_prompts: Sequence[str | None] | None = None,
    criteria: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_overflow: str = "truncate",
    chunk_size: int = 128,
) -> tuple[list[TokenizedPair], dict]:
    """Tokenize pairs with the tokenizer's chat template (as Scorer: render to text, then encode
    without special tokens). system_prompts: the system message per pair (assign_system_prompts);
    None uses each pair's own `system`. criteria: the run's criteria (aspect_index; an aspect
    outside them is a DataError); None: no criteria, every aspect_index is -1.

    A side over max_length: "truncate" cuts its answer from the right keeping the template's
    closing tokens (a prompt that alone does not fit is a DataError), "skip" drops the pair,
    "error" raises DataError naming it. A pair whose two sides are identical token sequences
    (after truncation) is dropped and counted: it carries no preference. Kept pairs keep their
    input order; `index` maps back.

    cache_dir: reuse / write `pairs-<key>.npz` there, key = hash of the data, the system prompts,
    the tokenizer (vocabulary, merges, template), max_length, on_overflow, criteria and library
    versions. A hit returns identical pairs without tokenizing.

    Returns (pairs, stats): stats has pairs, kept, truncated (kept pairs with a side cut),
    skipped_overflow, skipped_identical,
    tokens (standalone tokens of the kept pairs), cache ("hit" / "miss" / "off"), cache_file, seconds.
    """
    t0 = time.perf_counter()
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if system_prompts is None:
        system_prompts = [p.system for p in pairs]
    if len(system_prompts) != len(pairs):
        raise ValueError(f"{len(system_prompts)} system prompts for {len(pairs)} pairs")
    criteria = None if criteria is None else list(criteria)
    aspect_of = {c: i for i, c in enumerate(criteria or ())}
    for p in pairs if criteria is not None else ():
        if p.aspect is not None and p.aspect not in aspect_of:
            raise DataError(f"{p.source or 'a pair'}: aspect {p.aspect!r} is not among the run's criteria {criteria}")

    cache_file = None
    if cache_dir is not None:
        key = _cache_key(pairs, system_prompts, tokenizer, max_length, on_overflow, criteria)
        cache_file = Path(cache_dir) / f"pairs-{key[:32]}.npz"
        if cache_file.is_file():
            try:
                out, stats = _read_cache(cache_file)
                stats.update(cache="hit", cache_file=str(cache_file), seconds=time.perf_counter() - t0)
                logger.info("tokenized pairs: cache hit %s", cache_file)
                return out, stats
            except Exception as err:  # a damaged or old file: tokenize again and replace it
                logger.warning("ignoring unreadable tokenization cache %s (%s)", cache_file, err)

    out: list[TokenizedPair] = []
    stats = dict(pairs=len(pairs), kept=0, truncated=0, skipped_overflow=0, skipped_identical=0, tokens=0)
    for lo in range(0, len(pairs), chunk_size):
        idx = range(lo, min(lo + chunk_size, len(pairs)))
        out.extend(_tokenize_chunk(pairs, idx, tokenizer, max_length, system_prompts, aspect_of, on_overflow, stats))
    stats["kept"] = len(out)
    stats["tokens"] = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in out)
    if stats["truncated"] or stats["skipped_overflow"] or stats["skipped_identical"]:
        logger.warning(
            "tokenized %d pairs (max_length=%d): %d truncated, %d skipped over max_length, %d identical",
            len(pairs), max_length, stats["truncated"], stats["skipped_overflow"], stats["skipped_identical"],
        )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(cache_file, out, stats)
    stats.update(cache="miss" if cache_file else "off", cache_file=str(cache_file) if cache_file else None,
                 seconds=time.perf_counter() - t0)
    return out, stats


def _tokenize_chunk(pairs, idx, tokenizer, max_length, system_prompts, aspect_of, on_overflow, stats):
    convs, whats = [], []
    for i in idx:
        pair = pairs[i]
        for side, conv in zip(("chosen", "rejected"), conversations(pair, system_prompts[i])):
            convs.append(conv)
            whats.append(f"{pair.source or f'pair {i}'} ({side})")
    encoded = chat.encode(tokenizer, convs, max_length, on_overflow, whats, DataError, spans=True)

    result = []
    for j, i in enumerate(idx):
        c, r = encoded[2 * j], encoded[2 * j + 1]
        if c is None or r is None:  # on_overflow="skip"
            stats["skipped_overflow"] += 1
            continue
        if c.ids == r.ids:  # cut to the same tokens (or given identical): no preference left
            stats["skipped_identical"] += 1
            continue
        truncated = c.truncated or r.truncated
        stats["truncated"] += truncated
        pair = pairs[i]
        result.append(
            TokenizedPair(
                chosen_ids=c.ids,
                rejected_ids=r.ids,
                chosen_response_start=c.answer_start,
                aspect_index=aspect_of.get(pair.aspect, -1) if pair.aspect is not None else -1,
                margin=float(pair.margin) if pair.margin is not None else 0.0,
                language=pair.language,
                truncated=truncated,
                rejected_response_start=r.answer_start,
                index=i,
                chosen_target_end=c.target_end,
            )
        )
    return result


# ---------------------------------------------------------------------------------------- the cache
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokens: vocabulary, merges, normalizer, added tokens, chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    h.update(json.dumps(list(getattr(tokenizer, "all_special_tokens", [])), default=str).encode())
    return h.hexdigest()


def _cache_key(pairs, system_prompts, tokenizer, max_length, on_overflow, criteria) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256()
    settings = dict(
        version=_CACHE_VERSION, max_length=max_length, on_overflow=on_overflow, criteria=criteria,
        tokenizer=tokenizer_fingerprint(tokenizer), transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
    )
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p, s in zip(pairs, system_prompts):
        item = [p.prompt, p.chosen, p.rejected, s, p.aspect, p.language, p.margin]
        h.update(json.dumps(item, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))  # ids < 2**31
    return tokens, offsets


def _write_cache(path: Path, out: list[TokenizedPair], stats: dict) -> None:
    c_tok, c_off = _flat([t.chosen_ids for t in out])
    r_tok, r_off = _flat([t.rejected_ids for t in out])
    meta = dict(stats=stats, languages=[t.language for t in out])
    arrays = dict(
        chosen_tokens=c_tok, chosen_offsets=c_off, rejected_tokens=r_tok, rejected_offsets=r_off,
        chosen_response_start=np.array([t.chosen_response_start for t in out], dtype=np.int64),
        rejected_response_start=np.array([t.rejected_response_start for t in out], dtype=np.int64),
        chosen_target_end=np.array([t.chosen_target_end for t in out], dtype=np.int64),
        aspect_index=np.array([t.aspect_index for t in out], dtype=np.int64),
        margin=np.array([t.margin for t in out], dtype=np.float64),
        truncated=np.array([t.truncated for t in out], dtype=bool),
        index=np.array([t.index for t in out], dtype=np.int64),
        meta=np.array(json.dumps(meta)),
    )

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def _read_cache(path: Path) -> tuple[list[TokenizedPair], dict]:
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    meta = json.loads(str(a["meta"]))
    c = _split(a["chosen_tokens"], a["chosen_offsets"])
    r = _split(a["rejected_tokens"], a["rejected_offsets"])
    n = len(c)
    if not (len(r) == n == len(meta["languages"]) == len(a["index"])):
        raise ValueError("inconsistent cache arrays")
    out = [
        TokenizedPair(
            chosen_ids=c[i], rejected_ids=r[i],
            chosen_response_start=int(a["chosen_response_start"][i]),
            aspect_index=int(a["aspect_index"][i]), margin=float(a["margin"][i]),
            language=meta["languages"][i], truncated=bool(a["truncated"][i]),
            rejected_response_start=int(a["rejected_response_start"][i]), index=int(a["index"][i]),
            chosen_target_end=int(a["chosen_target_end"][i]),
        )
        for i in range(n)
    ]
    return out, dict(meta["stats"])


def _split(tokens: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat = tokens.tolist()
    bounds = offsets.tolist()
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
