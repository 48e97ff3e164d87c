"""The data preview (`python -m themis_engine.data preview`) against the REAL Qwen3 tokenizer and chat
template: its ids, spans, heads and LM-target mask are what the trainer trains on (the token store
prepare_data builds, the micro-batches build_micro_batches packs) and what the evaluator's Scorer
scores (ScoreReport.ids, Scorer.encode), on rows with system prompts, think blocks, answers that
repeat the prompt, over-length answers and a pair the cut makes identical. Then the command line
(in-process and as a subprocess, text and --json), the print at the start of a run, and bad input
(a missing column, a row that is not there, a tokenizer with no chat template) as named errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import qwen3_tokenizer_dir

import themis_engine as te
from themis_engine.config import parse_args
from themis_engine.data import CriteriaPrompts
from themis_engine.data import __main__ as cli
from themis_engine.data import preview as P
from themis_engine.errors import DataError
from themis_engine.eval import run as eval_run
from themis_engine.eval.config import EvalConfig
from themis_engine.testing.tiny import build_checkpoint
from themis_engine.train import microbatch
from themis_engine.train import trainer as T
from themis_engine.train.config import TrainConfig
from themis_engine.train.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 96
PROMPT = "Write a Python function that returns the sum of a list.\n```python\ndef total(xs):\n    pass\n```"
LONG = "".join(f"    x{i} = xs[{i}]\n" for i in range(60))
# (system, prompt, chosen, rejected, language, aspect)
ROWS = [
    ("You review Python code.", PROMPT,  # a think block; the rejected answer repeats the prompt's code
     "<think>Use the builtin sum.</think>```python\ndef total(xs):\n    return sum(xs)\n```",
     "```python\ndef total(xs):\n    pass\n```", "Python", "Functional_Correctness"),
    ("", "Reverse a string in Go.",  # the chosen answer is over max_length: cut, closing tokens kept
     "func rev(s string) string {\n" + LONG + "}", "func rev(s string) string { return s }", "Go",
     "Runtime_Efficiency"),
    ("Answer in C.", "Free the buffer.",  # the answers share their start: the prefix runs into them
     "free(buf);\nbuf = NULL;", "free(buf);", "C", "Memory_Efficiency"),
    ("", "Copy the list.",  # both sides cut to the same tokens: the trainer drops the pair
     "ys = []\n" + LONG + "return ys  # a", "ys = []\n" + LONG + "return ys  # b", "Python",
     "Readability_Maintainability"),
    ("Be strict.", "Run the query.",  # a think block with newlines in the rejected answer
     "cur.execute('SELECT * FROM t WHERE id = %s', (uid,))",
     "<think>\njust format it\n</think>\n\ncur.execute(f'SELECT * FROM t WHERE id = {uid}')", "Python",
     "Security_Hardness"),
    ("You review Python code.", PROMPT,  # the answer copies the prompt verbatim, then more
     PROMPT + "\nreturn sum(xs)", "return 0", "Python", "Functional_Correctness"),
]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def qwen_dir():
    return qwen3_tokenizer_dir()


@pytest.fixture(scope="module")
def tok(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_dir))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview_data")
    themis, crb = root / "pairs.jsonl", root / "crb.jsonl"
    with open(themis, "w") as f:
        for s, p, c, r, lang, aspect in ROWS:
            f.write(json.dumps(dict(system=s, input=p, chosen=c, rejected=r, language=lang, aspect=aspect)) + "\n")
    with open(crb, "w") as f:
        for i, (_, p, c, r, lang, aspect) in enumerate(ROWS):
            f.write(json.dumps(dict(id=f"crb-{i}", prompt=p, chosen=c, rejected=r, aspect=aspect, language=lang,
                                    subset="s")) + "\n")
    return SimpleNamespace(root=root, themis=themis, crb=crb)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, qwen_dir, tok):
    """A tiny random Qwen3 reward model over the real Qwen3 vocabulary, with the real tokenizer files."""
    out = tmp_path_factory.mktemp("preview_rm") / "rm"
    return build_checkpoint(out, tokenizer_dir=qwen_dir, family="qwen3", vocab_size=len(tok), hidden_size=16,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32,
                            criteria=list(te.DEFAULT_CRITERIA), pad_token_id=tok.pad_token_id)


def train_args(files, qwen_dir, *extra) -> list[str]:
    return ["--model.path", "tiny", "--model.tokenizer", str(qwen_dir), "--data.train", str(files.themis),
            "--data.max_length", str(MAX_LENGTH), "--data.eval_fraction", "0.34", "--data.workers", "1",
            "--run.max_tokens_per_batch", "1024", "--run.seed", "3", *map(str, extra)]


def train_cfg(files, qwen_dir, *extra) -> TrainConfig:
    cfg = parse_args(TrainConfig, train_args(files, qwen_dir, *extra))
    cfg.check()
    return cfg


def eval_args(files, rm_dir, *extra) -> list[str]:
    return [str(rm_dir), "--data", str(files.crb), "--max-length", str(MAX_LENGTH), *map(str, extra)]


# ------------------------------------------------------------------------------------------ the training path
@pytest.mark.parametrize("settings", [
    ("--objective.heads", "criteria", "--objective.lm_coef", "0.25"),
    ("--objective.heads", "scalar", "--objective.prompt_proportions", "[0.2, 0.3, 0.5]"),
], ids=["criteria-heads-lm", "scalar-criteria-prompts"])
def test_the_preview_is_what_the_trainer_trains_on(files, qwen_dir, tok, tmp_path, settings):
    cfg = train_cfg(files, qwen_dir, *settings, "--run.output", tmp_path)
    records = T.preview_data(cfg, tok, first=0)
    assert [r["row"] for r in records] == list(range(1, len(ROWS) + 1))
    heads = T.head_names(cfg)
    aspects = heads if cfg.objective.heads == "criteria" else list(cfg.objective.criteria)
    train, held, _ = prepare_data(cfg, tok, aspects, SimpleNamespace(is_main=True), tmp_path)

    by_split = {s: [r for r in records if r["split"] == s] for s in ("train", "held-out")}
    assert len(by_split["held-out"]) == 2 and len(by_split["train"]) == 4
    seen = set()
    for split, store in (("train", train), ("held-out", held)):
        for k, stored in enumerate(store):
            rec = by_split[split][stored.index]  # index: the pair's place in its split's list
            seen.add(rec["row"])
            c, r = rec["chosen"], rec["rejected"]
            assert rec["status"] == "kept" and rec["reason"] is None
            assert stored.chosen_ids.tolist() == c["ids"] and stored.rejected_ids.tolist() == r["ids"]
            assert (stored.chosen_response_start, stored.rejected_response_start) == (c["answer"][0], r["answer"][0])
            assert stored.prefix_len == rec["diverge_at"] and stored.truncated == rec["truncated"]
            assert stored.aspect_index == rec["aspect_index"] == aspects.index(ROWS[rec["row"] - 1][5])
            if rec["system"] is not None:  # the system prompt shown is the one in the stored ids
                assert rec["system"] in tok.decode(c["ids"])
            # what the trainer packs: the planner's stream, heads mask, score rows and LM labels
            H = len(heads)
            (mb,) = microbatch.build_micro_batches(store, [k], 1024, H, with_lm=True)
            assert mb.num_tokens == rec["tokens"]["packed"]
            assert int(mb.packed.prefix_len.max()) == rec["prefix_len"]
            assert mb.chosen_rows.tolist() == [c["score_at"]] and mb.rejected_rows.tolist() == [mb.num_tokens - 1]
            assert np.flatnonzero(mb.mask[0]).tolist() == rec["head_index"]
            assert rec["heads"] == [heads[h] for h in rec["head_index"]]
            if rec["lm_loss"]:
                mask = np.asarray(rec["target_mask"])
                assert (mb.lm_rows + 1).tolist() == np.flatnonzero(mask).tolist()
                assert mb.lm_labels.tolist() == np.asarray(c["ids"])[mask == 1].tolist()
                lo, hi = rec["target_span"]
                assert (lo, hi) == (c["answer"][0], c["closing"][0] + 1)  # the answer and the end-of-turn token
                assert tok.convert_ids_to_tokens(c["ids"][hi - 1]) == "<|im_end|>"
            else:
                assert rec["target_mask"] is None
    # the pair the cut made identical is the one the store lacks, and the preview says why
    (dropped,) = [r for r in records if r["row"] not in seen]
    assert dropped["row"] == 4 and dropped["status"] == "skipped" and "same tokens after the cut" in dropped["reason"]
    assert train.stats["skipped_identical"] + held.stats["skipped_identical"] == 1
    # the store keeps the record of its first training pair (printed at the start of a run, read
    # again on a restart without a row): the preview's own, as JSON
    first_train = next(r for r in records if r["split"] == "train")
    assert train.extra["preview"] == {"records": json.loads(json.dumps([first_train])),
                                      "settings": {"lm_loss": cfg.objective.lm_coef > 0, "heads": heads}}
    assert T.preview_data(cfg, tok, first=1, split="train") == [first_train]

    # what the rows show: the cut, the think block, the prefix running into the answers
    cut = records[1]["chosen"]
    assert records[1]["truncated"] and cut["length"] == MAX_LENGTH and cut["cut"] == cut["full_length"] - MAX_LENGTH
    assert cut["cut_message"] == (1 if records[1]["system"] is None else 2)  # the last message: the answer
    assert cut["closing"] == [MAX_LENGTH - 2, MAX_LENGTH] and "tokens cut" in records[1]["notes"][0]
    think = records[0]["chosen"]
    assert tok.decode(think["ids"][slice(*think["answer"])]).startswith("\nUse the builtin sum.\n</think>")
    shared = records[2]
    assert shared["prefix_len"] > shared["chosen"]["answer"][0]
    if cfg.objective.heads == "scalar":
        assert {r["system_kind"] for r in records} <= set(P.SYSTEM_KINDS) and records[0]["heads"] == ["reward"]
    else:
        assert [r["system_kind"] for r in records] == ["row", "none", "row", "none", "row", "row"]


def test_the_preview_is_what_the_scorer_scores(files, rm_dir, tok):
    cfg = parse_args(EvalConfig, eval_args(files, rm_dir, "--use-aspect-prompts"))
    records = eval_run.preview_data(cfg, first=0)
    scorer = te.Scorer.from_pretrained(rm_dir, device="cpu", dtype=torch.float32, max_length=MAX_LENGTH)
    prompts = CriteriaPrompts()
    systems = [prompts.for_criterion(row[5]) for row in ROWS]
    scorer.score_pairs([r[1] for r in ROWS], [r[2] for r in ROWS], [r[3] for r in ROWS], system=systems)
    report = scorer.last_report
    convs = [[{"role": "system", "content": s}, {"role": "user", "content": row[1]},
              {"role": "assistant", "content": answer}] for s, row in zip(systems, ROWS) for answer in row[2:4]]
    encoded = scorer.encode(convs)
    assert report.tokens_computed == sum(r["tokens"]["packed"] for r in records)
    for i, rec in enumerate(records):
        assert rec["status"] == "kept" and rec["purpose"] == "eval" and rec["system"] == systems[i]
        assert rec["system_kind"] == "own" and rec["heads"] == [ROWS[i][5]]
        assert rec["head_index"] == [scorer.criteria.index(ROWS[i][5])]
        for k, side in enumerate(("chosen", "rejected")):
            s, e = rec[side], encoded[2 * i + k]
            assert s["ids"] == report.ids[2 * i + k] == e.ids
            assert s["answer"] == [e.answer_start, e.closing_start] and s["full_length"] == e.full_length
        assert rec["lm_loss"] is False and rec["target_mask"] is None
    # the evaluator scores the pair the cut makes identical (counted wrong), it does not drop it
    assert "same tokens" in records[3]["notes"][-1] and records[3]["chosen"]["ids"] == records[3]["rejected"]["ids"]


# ------------------------------------------------------------------------------------------ the command line
def test_cli_json_and_text(files, qwen_dir, tok, capsys):
    args = train_args(files, qwen_dir, "--objective.lm_coef", "0.25")
    assert cli.main(["preview", *args, "--json", "--first", "0"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records, _, _ = cli.preview_from_args([*args, "--first", "0"])
    assert printed == records == T.preview_data(train_cfg(files, qwen_dir, "--objective.lm_coef", "0.25"), tok,
                                                first=0)
    for rec in printed:  # every field is documented in the module docstring
        for key in [*rec, *(rec["chosen"] or {})]:
            assert re.search(rf"^\s+{key}\b|[ ,]{key}[ ,:]", P.__doc__, re.M), key

    assert cli.main(["preview", *args, "--rows", "1,2,4"]) == 0
    text = capsys.readouterr().out
    assert [int(x) for x in re.findall(r"^row (\d+) ·", text, re.M)] == [1, 2, 4]
    for mark in ("── shared prefix", "── chosen", "── rejected", "⟨answer⟩", "⟨/answer⟩", "⟦", "⟧",
                 "⟨✂", "SKIPPED", "<|im_start|>system", "<think>", "3 pairs shown: 2 kept, 1 skipped"):
        assert mark in text, mark
    assert "\x1b[" not in text
    assert cli.main(["preview", *args, "--rows", "2", "--color", "always"]) == 0
    assert "\x1b[4m" in capsys.readouterr().out  # LM targets underlined

    out = files.root / "preview.jsonl"
    assert cli.main(["preview", "--for", "eval", *eval_args(files, qwen_dir.parent, "--head", "0"), "--json",
                     "--write", str(out)]) == 2  # not a model folder: one line
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_subprocess_eval_json(files, rm_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "themis_engine.data", "preview", "--for", "eval",
                          *eval_args(files, rm_dir, "--use-system-prompts", "--rows", "5,2", "--json")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = [json.loads(line) for line in res.stdout.splitlines()]
    cfg = parse_args(EvalConfig, eval_args(files, rm_dir, "--use-system-prompts"))
    assert printed == eval_run.preview_data(cfg, rows=[5, 2])
    assert [r["row"] for r in printed] == [5, 2] and printed[0]["system_kind"] == "all"


# ------------------------------------------------------------------------------------------ start of a run
def test_training_start_prints_one_pair_and_writes_the_file(files, qwen_dir, tok, tmp_path, capsys):
    cfg = train_cfg(files, qwen_dir, "--data.preview_file", "true", "--run.output", tmp_path)
    fake = SimpleNamespace(cfg=cfg, tokenizer=tok, output=tmp_path, data_report={})
    shown = T.Trainer.show_preview(fake)  # no preview kept with a store here: made from the rows
    out = capsys.readouterr().out
    assert "one training pair as the model reads it" in out and out.count("── shared prefix") == 1
    written = [json.loads(x) for x in (tmp_path / T.PREVIEW_FILE).read_text().splitlines()]
    assert written == T.preview_data(cfg, tok, first=0) and len(written) == len(ROWS)
    assert shown == [next(r for r in written if r["split"] == "train")]
    assert f"wrote the preview of {len(ROWS)} pairs" in out
    assert not parse_args(TrainConfig, ["--data.preview", "false"]).data.preview


def test_training_start_on_a_built_store_reads_no_row(files, qwen_dir, tok, tmp_path, capsys, monkeypatch):
    """The pair printed at the start of a run comes with the token store: a restart (the store
    built) prints the same pair without reading the data file again."""
    cfg = train_cfg(files, qwen_dir, "--run.output", tmp_path / "run", "--data.cache_dir", tmp_path / "cache")
    first = T.Trainer(cfg).show_preview()
    assert first == json.loads(json.dumps(T.preview_data(cfg, tok, first=1, split="train")))
    printed = capsys.readouterr().out
    assert "one training pair as the model reads it" in printed

    import themis_engine.data as D

    def no_rows(*a, **k):
        raise AssertionError("the rows were read again")

    monkeypatch.setattr(D, "load_pairs", no_rows)
    again = T.Trainer(cfg)
    assert again.show_preview() == first and capsys.readouterr().out == printed
    monkeypatch.undo()
    # the same store with the LM loss on: the kept record (no LM targets) is not shown, it is made again
    assert first[0]["target_mask"] is None
    lm = train_cfg(files, qwen_dir, "--run.output", tmp_path / "run", "--data.cache_dir", tmp_path / "cache",
                   "--objective.lm_coef", "0.25")
    shown = T.Trainer(lm).show_preview()
    assert shown[0]["lm_loss"] and sum(shown[0]["target_mask"]) > 0 and shown[0]["row"] == first[0]["row"]


def test_records_made_a_piece_at_a_time(files, qwen_dir, tok, monkeypatch):
    """Pieces of ENCODE_PAIRS pairs (a whole-file preview's memory is one piece's) give the same
    records as one piece, and bad row numbers are named before any record is made."""
    cfg = train_cfg(files, qwen_dir)
    whole = T.preview_data(cfg, tok, first=0)
    monkeypatch.setattr(P, "ENCODE_PAIRS", 2)
    lazy = T.preview_data(cfg, tok, first=0, lazy=True)
    assert not isinstance(lazy, list) and list(lazy) == whole
    with pytest.raises(DataError, match="row 9 does not exist"):
        T.preview_data(cfg, tok, rows=[9], lazy=True)


def test_evaluation_start_prints_one_row_and_writes_the_file(files, rm_dir, tmp_path, caplog):
    from themis_engine.eval import main

    out = tmp_path / "run"
    assert main(eval_args(files, rm_dir, "--output", out, "--progress=false", "--preview-file", "--limit", 3)) == 0
    logged = caplog.text  # the evaluator's log (stderr outside pytest)
    assert "the first row as the model scores it" in logged and logged.count("── shared prefix") == 1
    caplog.clear()
    written = [json.loads(x) for x in (out / eval_run.PREVIEW_FILE).read_text().splitlines()]
    cfg = parse_args(EvalConfig, eval_args(files, rm_dir, "--limit", 3))
    assert written == eval_run.preview_data(cfg, first=0) and len(written) == 3
    assert not parse_args(EvalConfig, ["--preview", "false"]).preview


# ------------------------------------------------------------------------------------------ bad input
def test_a_row_that_is_not_there(files, qwen_dir, tok, rm_dir, capsys):
    with pytest.raises(DataError, match=r"row 7 does not exist; it has 6 rows \(rows are counted from 1\)"):
        T.preview_data(train_cfg(files, qwen_dir), tok, rows=[7])
    assert cli.main(["preview", *train_args(files, qwen_dir), "--rows", "2,0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"themis_engine.data: error: {files.themis}: row 0 does not exist")
    assert cli.main(["preview", "--for", "eval", *eval_args(files, rm_dir, "--limit", 2, "--rows", 3)]) == 2
    assert "row 3 does not exist; it has 2 rows" in capsys.readouterr().err


def test_a_missing_column(files, qwen_dir, rm_dir, capsys):
    bad = files.root / "no_rejected.jsonl"
    bad.write_text("".join(json.dumps(dict(input=r[1], chosen=r[2])) + "\n" for r in ROWS))
    args = train_args(files, qwen_dir)
    args[args.index("--data.train") + 1] = str(bad)
    with pytest.raises(DataError, match=r"row 1, column 'rejected': missing from the file"):
        cli.preview_from_args(args)
    assert cli.main(["preview", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}, row 1, column 'rejected': missing" in err
    crb = files.root / "crb_no_subset.jsonl"
    crb.write_text("".join(json.dumps(dict(id=str(i), prompt=r[1], chosen=r[2], rejected=r[3], aspect=r[5],
                                           language=r[4])) + "\n" for i, r in enumerate(ROWS)))
    with pytest.raises(DataError, match=r"row 1: missing column 'subset'"):
        cli.preview_from_args(["--for", "eval", str(rm_dir), "--data", str(crb)])


def test_a_tokenizer_without_a_chat_template(files, qwen_dir, rm_dir, tmp_path, capsys):
    plain = tmp_path / "tok"
    shutil.copytree(qwen_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for f in plain.glob("*.jinja"):
        f.unlink()
    args = train_args(files, qwen_dir)
    args[args.index("--model.tokenizer") + 1] = str(plain)
    with pytest.raises(DataError, match=rf"{re.escape(str(files.themis))}:row 1 \(chosen\): the chat template could "
                                        "not render it"):
        cli.preview_from_args(args)
    assert cli.main(["preview", *args, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat_template is not set" in err
    model = tmp_path / "rm"  # the evaluator's model folder with the template taken out
    shutil.copytree(rm_dir, model)
    shutil.copy(plain / "tokenizer_config.json", model / "tokenizer_config.json")
    for f in model.glob("*.jinja"):
        f.unlink()
    with pytest.raises(DataError, match=r"crb.jsonl:row 1 \(chosen\): the chat template could not render it"):
        cli.preview_from_args(["--for", "eval", str(model), "--data", str(files.crb)])
