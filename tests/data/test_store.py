"""The token store: the same pairs as the in-memory path, the same files for any number of workers,
a killed build resumed from its shards, damage detected, and a trainer that maps a built store
without reading a row and trains exactly as on the in-memory pairs."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

from themis_engine import data as D
from themis_engine.data import store as S
from themis_engine.data import synthetic
from themis_engine.errors import DataError

FIELDS = ("chosen_response_start", "rejected_response_start", "chosen_target_end", "aspect_index", "margin",
          "language", "truncated", "index")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pairs = synthetic.make_demo_pairs(300, seed=0)
    tok = synthetic.build_demo_tokenizer(pairs, tmp_path_factory.mktemp("tok") / "tok")
    criteria = list(D.CRITERION_PROMPTS)
    systems = D.assign_system_prompts(pairs, "scalar", criteria, None, seed=1)
    return pairs, tok, systems, criteria


def test_the_store_holds_what_tokenize_pairs_returns(demo, tmp_path):
    pairs, tok, systems, criteria = demo
    ref, stats = D.tokenize_pairs(pairs, tok, 160, systems, criteria)
    store = S.build_store(tmp_path / "s", pairs, tok, 160, systems, criteria, shard_pairs=64, progress=False)
    assert len(store) == len(ref) and stats["truncated"] > 0
    for r, s in zip(ref, store):
        assert s.chosen_ids.dtype == np.int32 and not s.chosen_ids.flags.writeable
        assert s.chosen_ids.tolist() == r.chosen_ids and s.rejected_ids.tolist() == r.rejected_ids
        assert tuple(getattr(s, f) for f in FIELDS) == tuple(getattr(r, f) for f in FIELDS)
        n = 0
        while r.chosen_ids[n] == r.rejected_ids[n]:
            n += 1
        assert s.prefix_len == n
    assert {k: store.stats[k] for k in ("kept", "truncated", "tokens")} == {k: stats[k] for k in
                                                                           ("kept", "truncated", "tokens")}
    # opened again from disk (what every later run and every other rank does)
    again = S.TokenStore(tmp_path / "s")
    assert again[7].chosen_ids.tolist() == ref[7].chosen_ids and again[-1].index == ref[-1].index


def test_the_token_file_is_read_not_mapped(demo, tmp_path):
    """Reading every pair maps no page of the token file (a mapping would count every page a run
    touches, and the read-ahead around it, in the process's RSS: growing with the data set), and a
    store handed to another process (pickled, or forked) reads the same ids with its own descriptor."""
    import multiprocessing as mp
    import pickle

    pairs, tok, systems, criteria = demo
    store = S.build_store(tmp_path / "s", pairs, tok, 160, systems, criteria, progress=False)
    ids = [(p.chosen_ids.tolist(), p.rejected_ids.tolist()) for p in store]
    assert sum(len(c) + len(r) for c, r in ids) == store.manifest["tokens"]
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path / "s" / S.TOKENS) not in maps.read_text()
    copy = pickle.loads(pickle.dumps(store))
    assert [(p.chosen_ids.tolist(), p.rejected_ids.tolist()) for p in copy] == ids
    if "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(1) as pool:
            assert pool.apply(_read_all, (store,)) == ids


def _read_all(store):
    return [(p.chosen_ids.tolist(), p.rejected_ids.tolist()) for p in store]


def test_workers_write_the_same_files_as_one_process(demo, tmp_path):
    pairs, tok, systems, criteria = demo
    one = S.build_store(tmp_path / "one", pairs, tok, 160, systems, criteria, workers=1, shard_pairs=50,
                        progress=False)
    two = S.build_store(tmp_path / "two", pairs, tok, 160, systems, criteria, workers=2, shard_pairs=50,
                        progress=False)
    assert sorted(one.manifest["files"]) == sorted(two.manifest["files"])
    for name in one.manifest["files"]:
        assert filecmp.cmp(one.folder / name, two.folder / name, shallow=False), name
    assert not (tmp_path / "two.partial").exists()


def test_a_killed_build_resumes_from_its_shards(demo, tmp_path, monkeypatch):
    pairs, tok, systems, criteria = demo
    calls = []
    real = S._tokenize_shard

    def dies_on_third(partial, k, *args):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill between shards
        return real(partial, k, *args)

    monkeypatch.setattr(S, "_tokenize_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        S.build_store(tmp_path / "s", pairs, tok, 160, systems, criteria, shard_pairs=64, progress=False)
    assert not S.is_built(tmp_path / "s") and len(list((tmp_path / "s.partial").glob("shard-*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(S, "_tokenize_shard", real)
    counted = []
    monkeypatch.setattr(S, "_tokenize_shard", lambda partial, k, *a: counted.append(k) or real(partial, k, *a))
    store = S.build_store(tmp_path / "s", pairs, tok, 160, systems, criteria, shard_pairs=64, progress=False)
    assert counted == [2, 3, 4]  # shards 0 and 1 were not tokenized again
    whole = S.build_store(tmp_path / "w", pairs, tok, 160, systems, criteria, shard_pairs=64, progress=False)
    for name in whole.manifest["files"]:
        assert filecmp.cmp(store.folder / name, whole.folder / name, shallow=False), name


def test_damage_is_detected(demo, tmp_path):
    pairs, tok, systems, criteria = demo
    store = S.build_store(tmp_path / "s", pairs[:40], tok, 160, systems[:40], criteria, progress=False)
    tokens = store.folder / S.TOKENS
    with open(tokens, "r+b") as f:
        f.truncate(tokens.stat().st_size - 4)
    with pytest.raises(DataError, match=r"tokens.int32: missing or not the size its manifest says"):
        S.TokenStore(store.folder)
    assert S.open_store(store.folder) is None  # the trainer builds it again
    with pytest.raises(DataError, match="not a token store"):
        S.TokenStore(tmp_path)


# ------------------------------------------------------------------------------------- the trainer
def _trainer_cfg(output, cache, train_file, tok_dir):
    from themis_engine.config import apply
    from themis_engine.train.config import TrainConfig

    cfg = apply(TrainConfig(), {
        "model": {"path": "tiny", "overrides": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                                "head_dim": 8, "intermediate_size": 64}, "dtype": "float32",
                  "tokenizer": str(tok_dir)},
        "data": {"train": [str(train_file)], "eval_fraction": 0.25, "max_length": 160, "cache_dir": str(cache),
                 "workers": 1},
        "objective": {"heads": "criteria", "lm_coef": 0.1, "magnitude_coef": 0.01},
        "optim": {"lr": 3e-3, "terminal_lr": 3e-4, "clip": 1.0},
        "run": {"global_batch_pairs": 12, "max_tokens_per_batch": 1024, "max_steps": 3, "progress": False,
                "device": "cpu", "checkpoint_every": 0, "export": False},
    })
    cfg.run.output = str(output)
    return cfg


@pytest.fixture(scope="module")
def data_file(demo, tmp_path_factory):
    pairs, tok, _, _ = demo
    root = tmp_path_factory.mktemp("files")
    path = root / "pairs.jsonl"
    D.write_jsonl(D.pairs_to_rows(pairs[:120]), path)
    tok.save_pretrained(str(root / "tok"))
    return path, root / "tok"


def test_a_later_run_maps_the_store_without_reading_a_row(data_file, tmp_path, monkeypatch):
    from themis_engine.train import prepare
    from themis_engine.train.trainer import Trainer

    path, tok_dir = data_file
    first = Trainer(_trainer_cfg(tmp_path / "a", tmp_path / "cache", path, tok_dir))
    assert isinstance(first.train_pairs, S.TokenStore) and first.data_report["rows"] == 120

    def no(*a, **k):
        raise AssertionError("read or tokenized again")

    monkeypatch.setattr(D, "load_pairs", no)
    monkeypatch.setattr(prepare, "build_store", no)
    second = Trainer(_trainer_cfg(tmp_path / "b", tmp_path / "cache", path, tok_dir))
    assert second.train_pairs.folder == first.train_pairs.folder and second.data_report["rows"] == 120
    # another max_length is another store (and the patched reader proves it reads again)
    cfg = _trainer_cfg(tmp_path / "c", tmp_path / "cache", path, tok_dir)
    cfg.data.max_length = 150
    with pytest.raises(AssertionError, match="read or tokenized again"):
        Trainer(cfg)


def test_training_on_the_store_equals_the_in_memory_pairs(data_file, tmp_path):
    import torch

    from themis_engine.data.prompts import CriteriaPrompts
    from themis_engine.train.prepare import split_pairs
    from themis_engine.train.trainer import Trainer

    path, tok_dir = data_file
    on_store = Trainer(_trainer_cfg(tmp_path / "a", tmp_path / "cache", path, tok_dir))
    in_memory = Trainer(_trainer_cfg(tmp_path / "b", tmp_path / "cache2", path, tok_dir))
    cfg = in_memory.cfg
    pairs, _ = D.load_pairs([str(path)], criteria=list(in_memory.aspects))
    lists = []
    for split_no, part in enumerate(split_pairs(pairs, cfg.data.eval_fraction, cfg.data.seed)):
        systems = D.assign_system_prompts(part, cfg.objective.heads, list(in_memory.aspects), CriteriaPrompts(),
                                          tuple(cfg.objective.prompt_proportions), seed=cfg.run.seed + split_no)
        lists.append(D.tokenize_pairs(part, in_memory.tokenizer, cfg.data.max_length, systems,
                                      list(in_memory.aspects))[0])
    in_memory.train_pairs, in_memory.eval_pairs = lists
    assert len(lists[0]) == len(on_store.train_pairs) and len(lists[1]) == len(on_store.eval_pairs)
    a = [on_store.train_step()["loss"] for _ in range(3)]
    b = [in_memory.train_step()["loss"] for _ in range(3)]
    assert a == b
    for (k, x), (_, y) in zip(on_store.objective.state_dict().items(), in_memory.objective.state_dict().items()):
        assert torch.equal(x, y), k
    assert on_store.evaluate() == in_memory.evaluate()


def test_hugging_face_datasets_as_a_source(demo, tmp_path):
    """A folder of Parquet shards and a datasets.save_to_disk folder read as the same pairs as JSONL."""
    datasets = pytest.importorskip("datasets")  # installed with trl in CI (.ci/clients/trl.sh)
    pairs = demo[0][:30]
    rows = D.pairs_to_rows(pairs)
    D.write_jsonl(rows, tmp_path / "pairs.jsonl")
    (tmp_path / "shards").mkdir()
    cols = {k: [r.get(k) for r in rows] for k in rows[0]}
    D.write_parquet({k: v[:15] for k, v in cols.items()}, tmp_path / "shards" / "part-0.parquet")
    D.write_parquet({k: v[15:] for k, v in cols.items()}, tmp_path / "shards" / "part-1.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(str(tmp_path / "saved_dict"))
    want, _ = D.load_pairs(str(tmp_path / "pairs.jsonl"))
    for source in ("shards", "saved", "saved_dict"):
        got, report = D.load_pairs(str(tmp_path / source))
        assert [(p.prompt, p.chosen, p.rejected, p.aspect, p.language) for p in got] == \
            [(p.prompt, p.chosen, p.rejected, p.aspect, p.language) for p in want], source
    fp = S.source_fingerprint(str(tmp_path / "saved"))
    assert fp["files"] and all("blake2b" in f for f in fp["files"])
    with pytest.raises(DataError, match="without the split 'test'"):
        D.read_rows(tmp_path / "saved_dict", split="test")
