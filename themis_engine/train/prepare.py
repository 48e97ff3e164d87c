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
import logging
import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np

from themis_engine import distributed
from themis_engine.data.prompts import CriteriaPrompts
from themis_engine.data.store import FORMAT, TokenStore, build_store, open_store, settings_key, source_fingerprint
from themis_engine.errors import ConfigError, TrainingError

SPLITS = ("train", "eval")
logger = logging.getLogger("themis_engine")


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
            ordered, train, held = synthetic_pairs
            report = {"rows": len(train) + len(held), "kept": len(train) + len(held), "skipped": 0}
        else:
            ordered, train, held, report = _read_pairs(cfg, aspects, data_mod)
        # the first training pair as `python -m themis_engine.data preview` shows it, kept with the
        # store: the run prints it at its start (data.preview) without reading the rows again
        first = _first_preview(cfg, tokenizer, ordered, train, held if ordered is not train else [])
        workers = cfg.data.workers or _cores()
        for split_no, (pairs, folder) in enumerate(zip((train, held), folders)):
            systems = data_mod.assign_system_prompts(
                pairs, cfg.objective.heads, list(aspects), prompts,
                tuple(cfg.objective.prompt_proportions), seed=cfg.run.seed + split_no,
            )
            # aspect_index indexes the aspects; with one head every pair trains it (microbatch.pair_mask)
            build_store(folder, pairs, tokenizer, cfg.data.max_length, systems, list(aspects), workers=workers,
                        key=settings_key(dict(settings, split=SPLITS[split_no])),
                        extra={"report": _jsonable(report), "preview": first} if split_no == 0 else {})
    # every rank: wait for rank 0's tokenization (a long one: a CPU-side barrier with a long timeout)
    distributed.barrier(distributed.gloo_group(timeout=timedelta(hours=12)))
    train, held = [TokenStore(f) for f in folders]
    report = dict(train.extra.get("report", {}))
    report["preview"] = train.extra.get("preview")  # None: a store built without it
    for split, store in zip(SPLITS, (train, held)):
        report[f"{split}_tokenization"] = dict(store.stats, store=str(store.folder))
    if not len(train):
        raise TrainingError("the training set is empty after filtering")
    report["tokenizer"] = tokenizer
    return train, held, report


def preview_settings(cfg) -> dict:
    """What a stored preview record depends on beyond the store's key: the LM loss and the heads."""
    return {"lm_loss": cfg.objective.lm_coef > 0, "heads": head_names(cfg)}


def _first_preview(cfg, tokenizer, ordered, train, held) -> dict:
    """The preview of the first training pair with the settings it was made for, kept in the train
    store's manifest. A preview that fails is logged and left out: it never stops the run."""
    try:
        records = preview_records(cfg, tokenizer, ordered, train, held, first=1, split="train",
                                  what="the training data") if train else []
    except Exception as err:  # noqa: BLE001 (the run goes on; the preview command shows the error)
        logger.warning("the data preview failed (%s); `python -m themis_engine.data preview` shows it", err)
        return {"records": [], "settings": None}
    return {"records": records, "settings": preview_settings(cfg)}


def stored_preview(cfg, report: dict) -> list[dict] | None:
    """The first training pair's preview kept with the store, or None when there is none or it was
    made for another LM-loss or heads setting (then the caller makes it again)."""
    kept = report.get("preview")
    if not isinstance(kept, dict) or kept.get("settings") != preview_settings(cfg):
        return None
    return kept["records"]


def _read_pairs(cfg, aspects, data_mod):
    criteria = list(aspects)
    train, rep = data_mod.load_pairs(cfg.data.train, cfg.data.schema, cfg.data.columns or None, criteria,
                                     cfg.data.on_bad_row)
    report = asdict(rep) if hasattr(rep, "__dataclass_fields__") else dict(rep)
    ordered = train
    if cfg.data.eval:
        held, _ = data_mod.load_pairs(cfg.data.eval, cfg.data.schema, cfg.data.columns or None, criteria,
                                      cfg.data.on_bad_row)
    else:
        train, held = split_pairs(ordered, cfg.data.eval_fraction, cfg.data.seed)
    return ordered, train, held, report


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
    return (pairs, train, held), tokenizer


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


# ---------------------------------------------------------------------------------------- the preview
def head_names(cfg) -> list[str]:
    """The reward heads of a run. Criteria mode: a classifier checkpoint's own id2label, else
    objective.criteria. Scalar mode: one head ("reward", or the checkpoint's name for its single head)."""
    names = None
    if cfg.model.shape_name() is None:  # a checkpoint folder
        from themis_engine.model.args import criteria_from_config
        from themis_engine.model.hf_checkpoint import read_config

        hf = read_config(cfg.model.path)
        classifier = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
        if classifier and hf.get("id2label"):
            names = list(criteria_from_config(hf))
    if cfg.objective.heads == "scalar":
        if names is not None and len(names) != 1:
            raise TrainingError(f"heads=scalar but {cfg.model.path} has {len(names)} heads ({names})")
        return names or ["reward"]
    return names or list(cfg.objective.criteria)


def preview_data(cfg, tokenizer=None, rows=None, first: int | None = 3, files: str = "train",
                 split: str | None = None, lazy: bool = False) -> list[dict]:
    """The preview records (themis_engine.data.preview) of the run's rows, as the trainer tokenizes
    them: the rows read as prepare_data reads them, the held-out split drawn the same way, then
    preview_records.

    tokenizer: None loads the run's (model.tokenizer or the model folder; for the synthetic demo
    with a named shape, the tokenizer built from the generated pairs, as the trainer builds it).
    rows: row numbers counted from 1 (DataError for one that is not there); else the first `first`
    (0: every row). files: "train" (the rows of data.train, or the synthetic pairs) or "eval" (the
    data.eval files). split: only the rows of that split ("train" or "held-out") count for `first`.
    lazy: an iterator of the records, made a piece at a time (to write a whole file: write_jsonl)."""
    from themis_engine import data as D

    d, o = cfg.data, cfg.objective
    aspects = head_names(cfg) if o.heads == "criteria" else list(o.criteria)
    if d.synthetic_pairs:
        from themis_engine.data import synthetic

        if files != "train":
            raise ConfigError("data.synthetic_pairs: the synthetic pairs are split by data.eval_fraction; preview "
                              "them with files='train' (each record names its split)")
        pairs = synthetic.make_demo_pairs(d.synthetic_pairs, seed=d.seed)
        train, held = synthetic.split_pairs(pairs, d.eval_fraction, seed=d.seed)
        what = f"the {len(pairs)} synthetic pairs (data.synthetic_pairs)"
    else:
        sources = d.train if files == "train" else d.eval
        if not sources:
            raise ConfigError(f"data.{files} is empty: no rows to preview" + (
                "; the held-out pairs are drawn from data.train (its records name their split)"
                if files == "eval" else ""))
        pairs, _ = D.load_pairs(sources, d.schema, d.columns or None, aspects, d.on_bad_row)
        if files == "eval":
            train, held = [], pairs
        elif d.eval:
            train, held = pairs, []
        else:
            train, held = split_pairs(pairs, d.eval_fraction, d.seed)
        what = ", ".join(map(str, sources))
    if tokenizer is None:
        tokenizer = preview_tokenizer(cfg)
    return preview_records(cfg, tokenizer, pairs, train, held, rows=rows, first=first, split=split, what=what,
                           lazy=lazy)


def preview_records(cfg, tokenizer, pairs, train, held, rows=None, first: int | None = 3, split: str | None = None,
                    what: str = "the data", lazy: bool = False) -> list[dict]:
    """The preview records of `pairs` (all rows in order; `train` and `held` its two splits, the same
    objects): each pair's system prompt drawn for its split with its seed (run.seed + 0 for train,
    + 1 for the held-out pairs, as prepare_data), its aspect's index among the run's criteria and
    the heads it trains (microbatch.pair_mask), LM targets when objective.lm_coef > 0. rows, first,
    split, lazy: as preview_data."""
    from themis_engine import data as D
    from themis_engine.data.preview import iter_preview_pairs, preview_pairs, system_kind
    from themis_engine.data.prompts import PROMPT_NONE
    from themis_engine.train import microbatch

    d, o = cfg.data, cfg.objective
    heads = head_names(cfg)
    aspects = heads if o.heads == "criteria" else list(o.criteria)
    prompts = D.CriteriaPrompts.from_file(o.criteria_prompts) if o.criteria_prompts else D.CriteriaPrompts()
    at = {id(p): i for i, p in enumerate(pairs)}
    systems, kinds, splits = [None] * len(pairs), ["none"] * len(pairs), ["train"] * len(pairs)
    for split_no, (name, part) in enumerate((("train", train), ("held-out", held))):
        texts = D.assign_system_prompts(part, o.heads, list(aspects), prompts, tuple(o.prompt_proportions),
                                        seed=cfg.run.seed + split_no)  # as prepare_data
        drawn = (D.draw_prompt_kinds(part, tuple(o.prompt_proportions), seed=cfg.run.seed + split_no)
                 if o.heads == "scalar" else [PROMPT_NONE] * len(part))
        for p, text, kind in zip(part, texts, drawn):
            i = at[id(p)]
            systems[i], kinds[i], splits[i] = text, system_kind(kind, p.system), name
    if rows is None and split is not None:
        rows = [i + 1 for i in range(len(pairs)) if splits[i] == split][: first or None]
    H = len(heads)
    return (iter_preview_pairs if lazy else preview_pairs)(
        pairs, tokenizer, d.max_length, system_prompts=systems, system_kinds=kinds, criteria=list(aspects),
        head_names=heads, heads_for=lambda i, a: np.flatnonzero(microbatch.pair_mask(a, H)).tolist(), splits=splits,
        rows=rows, first=first, on_overflow="truncate", lm_loss=o.lm_coef > 0, purpose="train", what=what,
    )


def preview_tokenizer(cfg):
    """The run's tokenizer for preview_data, loaded as the trainer loads it (model.tokenizer or the
    model folder; for the synthetic demo with a named shape, built from the generated training pairs
    as prepare_data builds it), without checking its chat template: a template that cannot render is
    the chat path's DataError naming the row."""
    from themis_engine.model.folder import load_tokenizer

    m = cfg.model
    if m.tokenizer or m.shape_name() is None:
        return load_tokenizer(m.tokenizer or m.path)
    if not cfg.data.synthetic_pairs:
        raise TrainingError(f"model.path is the named shape {m.path!r} and no model.tokenizer is given: no tokenizer "
                            "to preview the data with")
    import tempfile

    from transformers import AutoTokenizer

    from themis_engine.data import synthetic

    pairs = synthetic.make_demo_pairs(cfg.data.synthetic_pairs, seed=cfg.data.seed)
    train, _ = synthetic.split_pairs(pairs, cfg.data.eval_fraction, seed=cfg.data.seed)
    with tempfile.TemporaryDirectory() as tmp:  # as prepare_data: built from the training pairs, then loaded
        synthetic.build_demo_tokenizer(train, tmp)
        return AutoTokenizer.from_pretrained(tmp)


