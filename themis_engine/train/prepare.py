"""The trainer's data, prepared once and shared by every rank: two token stores (train, held-out).

    train, held, report = prepare_data(cfg, tokenizer, aspects, dist, output)

The stores (themis_engine.data.store) live under `data.cache_dir` (default `<output>/cache`), named
by a key over everything that decides their tokens: the data files' contents (size + BLAKE2b; a
datasets save_to_disk folder by its files; a Hub dataset id as given), the
schema, column mapping, bad-row policy and split, the criteria and their system prompts (mode,
texts, proportions, seed), the tokenizer and chat template, max_length and the library versions.
A later run with the same key maps the stores without reading a single row. On a miss rank 0 reads
the rows and tokenizes them with `data.workers` processes (0: every core of the machine) while the
other ranks wait at a barrier; then every rank maps the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np

from themis_engine import distributed
from themis_engine.data.prompts import CriteriaPrompts
from themis_engine.data.store import FORMAT, TokenStore, build_store, open_store, settings_key, source_fingerprint
from themis_engine.errors import TrainingError

SPLITS = ("train", "eval")


def prepare_data(cfg, tokenizer, aspects, dist, output: Path):
    """(train store, held-out store, report): see the module docstring. `tokenizer` may be None for
    the synthetic set (its tokenizer is built from the generated pairs; returned in the report as
    "tokenizer")."""
    from themis_engine import data as data_mod

    root = Path(cfg.data.cache_dir or output / "cache")
    synthetic_pairs = None
    if cfg.data.synthetic_pairs:
        synthetic_pairs, tokenizer = _synthetic(cfg, tokenizer, dist, output)
    elif not cfg.data.train:
        raise TrainingError("no training data: set data.train (files) or data.synthetic_pairs")
    prompts = (CriteriaPrompts.from_file(cfg.objective.criteria_prompts) if cfg.objective.criteria_prompts
               else CriteriaPrompts())
    settings = _settings(cfg, tokenizer, aspects, prompts)
    folders = [root / f"store-{split}-{settings_key(dict(settings, split=split))[:24]}" for split in SPLITS]
    # rank 0 alone decides whether to build (every rank deciding on its own could let one skip the
    # barrier below while another waits at it); the others wait for it, then map the same files
    if dist.is_main and any(open_store(f) is None for f in folders):
        if synthetic_pairs is not None:
            train, held = synthetic_pairs
            report = {"rows": len(train) + len(held), "kept": len(train) + len(held), "skipped": 0}
        else:
            train, held, report = _read_pairs(cfg, aspects, data_mod)
        workers = cfg.data.workers or _cores()
        for split_no, (pairs, folder) in enumerate(zip((train, held), folders)):
            systems = data_mod.assign_system_prompts(
                pairs, cfg.objective.heads, list(aspects), prompts,
                tuple(cfg.objective.prompt_proportions), seed=cfg.run.seed + split_no,
            )
            # aspect_index indexes the aspects; with one head every pair trains it (microbatch.pair_mask)
            build_store(folder, pairs, tokenizer, cfg.data.max_length, systems, list(aspects), workers=workers,
                        key=settings_key(dict(settings, split=SPLITS[split_no])),
                        extra={"report": _jsonable(report)} if split_no == 0 else {})
    # every rank: wait for rank 0's tokenization (a long one: a CPU-side barrier with a long timeout)
    distributed.barrier(distributed.gloo_group(timeout=timedelta(hours=12)))
    train, held = [TokenStore(f) for f in folders]
    report = dict(train.extra.get("report", {}))
    for split, store in zip(SPLITS, (train, held)):
        report[f"{split}_tokenization"] = dict(store.stats, store=str(store.folder))
    if not len(train):
        raise TrainingError("the training set is empty after filtering")
    report["tokenizer"] = tokenizer
    return train, held, report


def _read_pairs(cfg, aspects, data_mod):
    criteria = list(aspects)
    train, rep = data_mod.load_pairs(cfg.data.train, cfg.data.schema, cfg.data.columns or None, criteria,
                                     cfg.data.on_bad_row)
    report = asdict(rep) if hasattr(rep, "__dataclass_fields__") else dict(rep)
    if cfg.data.eval:
        held, _ = data_mod.load_pairs(cfg.data.eval, cfg.data.schema, cfg.data.columns or None, criteria,
                                      cfg.data.on_bad_row)
    else:
        train, held = split_pairs(train, cfg.data.eval_fraction, cfg.data.seed)
    return train, held, report


def split_pairs(pairs, fraction, seed):
    """(kept, held out): `fraction` of the pairs, drawn with `seed`, in their input order."""
    n_eval = int(round(len(pairs) * fraction))
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = set(order[:n_eval].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def _synthetic(cfg, tokenizer, dist, output: Path):
    """The demo's generated pairs (cheap to make again) and, without a model tokenizer, the small
    tokenizer trained on them (rank 0 writes it, every rank loads it)."""
    from themis_engine.data import synthetic

    pairs = synthetic.make_demo_pairs(cfg.data.synthetic_pairs, seed=cfg.data.seed)
    train, held = synthetic.split_pairs(pairs, cfg.data.eval_fraction, seed=cfg.data.seed)
    if tokenizer is None:
        tok_dir = output / "tokenizer"
        if dist.is_main:
            synthetic.build_demo_tokenizer(train, tok_dir)
        distributed.barrier()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return (train, held), tokenizer


def _settings(cfg, tokenizer, aspects, prompts: CriteriaPrompts) -> dict:
    """Everything that decides the stores' tokens (JSON-able), for their key."""
    import tokenizers
    import transformers

    from themis_engine.data.schemas import _expand_sources
    from themis_engine.data.tokenize import tokenizer_fingerprint

    def sources(names):
        return [source_fingerprint(s) for s in _expand_sources(names)] if names else []

    d = cfg.data
    data = (dict(synthetic_pairs=d.synthetic_pairs, seed=d.seed, eval_fraction=d.eval_fraction)
            if d.synthetic_pairs else
            dict(train=sources(d.train), eval=sources(d.eval), schema=d.schema, columns=d.columns,
                 on_bad_row=d.on_bad_row, eval_fraction=None if d.eval else d.eval_fraction,
                 seed=None if d.eval else d.seed))
    o = cfg.objective
    return dict(
        format=FORMAT, data=data, max_length=d.max_length, on_overflow="truncate", aspects=list(aspects),
        heads=o.heads, prompts=json.dumps(_jsonable(vars(prompts)), sort_keys=True, default=str),
        proportions=list(o.prompt_proportions), prompt_seed=cfg.run.seed,
        tokenizer=tokenizer_fingerprint(tokenizer), transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
