"""The CodeRewardBench evaluator (`python -m themis_engine.eval`) on generated CRB-format files and
tiny random checkpoints: the published output format, the scores, heads, prompts, bad rows,
resume after an interruption, --compare, and two torchrun processes against one."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from helpers import make_checkpoint, random_text  # noqa: E402

from themis_engine import DEFAULT_CRITERIA, Scorer  # noqa: E402
from themis_engine.data.prompts import ALL_CRITERIA_PROMPT, CRITERION_PROMPTS  # noqa: E402
from themis_engine.data.tables import DataError, write_parquet  # noqa: E402
from themis_engine.eval import read_scores  # noqa: E402
from themis_engine.eval import run as crb_eval  # noqa: E402
from themis_engine.eval.partial import PartialStore, ResumeError  # noqa: E402
from themis_engine.eval.results import compile_results  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO.parent / "shared" / "data" / "crb-published-results"
LANGUAGES = ["Python", "Cpp", "Java", "Go"]
SUBSETS = ["RUNBUGRUN", "COMMITPREFS_SECURITY", "ECCO"]
N_ROWS = 40


def make_rows(n: int = N_ROWS, seed: int = 0) -> list[dict]:
    """CRB-shaped rows over 5 aspects x 4 languages x 3 subsets; every 9th pair is a tie
    (chosen == rejected), about half share a long opening (commit-style)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = random_text(rng, 3, 25)
        if i % 9 == 4:
            rejected = chosen
        elif i % 2:
            rejected = chosen + " " + random_text(rng, 1, 6)
        else:
            rejected = random_text(rng, 3, 25)
        rows.append({
            "id": f"crb-{i:03d}",
            "prompt": random_text(rng, 4, 20),
            "chosen": chosen,
            "rejected": rejected,
            "aspect": DEFAULT_CRITERIA[i % 5],
            "language": LANGUAGES[(i // 2) % 4],
            "subset": SUBSETS[i % 3],
        })
    return rows


@pytest.fixture(scope="module")
def crb(tmp_path_factory):
    root = tmp_path_factory.mktemp("crb")
    rows = make_rows()
    jsonl = root / "crb.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = root / "crb.parquet"
    write_parquet({k: [r[k] for r in rows] for k in rows[0]}, parquet)
    return {
        "root": root,
        "rows": rows,
        "jsonl": jsonl,
        "parquet": parquet,
        "multi": make_checkpoint(root, "rm-5", criteria=list(DEFAULT_CRITERIA)),
        "single": make_checkpoint(root, "rm-1", num_labels=1, seed=1),
    }


def evaluate(crb, out, *args, model="multi", data="jsonl"):
    argv = [str(crb[model]), "--data", str(crb[data]), "--output", str(out), "--progress=false", *map(str, args)]
    return crb_eval.run(crb_eval.parse(argv))


def direct_scores(model_dir, rows, heads, systems=None, every_head=False):
    """Scorer.score (no prefix sharing) on each row's two conversations: at the given heads, or
    (every_head) all heads [N, H]."""
    scorer = Scorer.from_pretrained(model_dir, device="cpu")
    systems = systems or [None] * len(rows)

    def conv(r, response, system):
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": response}]

    both = scorer.score([conv(r, r[k], s) for k in ("chosen", "rejected") for r, s in zip(rows, systems)])
    c, j = both[: len(rows)], both[len(rows) :]
    if every_head:
        return c.double().numpy(), j.double().numpy()
    take = torch.arange(len(rows))
    head = torch.as_tensor(heads)
    return c[take, head].double().numpy(), j[take, head].double().numpy()


def published_results() -> dict:
    return json.loads((PUBLISHED / "Themis-RM-8B" / "results.json").read_text())


# ------------------------------------------------------------------------------------------ format
def test_outputs_are_the_published_format_and_agree_with_scores(crb, tmp_path):
    out = tmp_path / "run"
    results = evaluate(crb, out, "--chunk-size", 16)
    raw = (out / "results.json").read_text()
    res = json.loads(raw)
    assert res == results
    assert raw == json.dumps(res, indent=2)  # the published layout: indent 2, no final newline

    pub = published_results()
    assert list(res) == list(pub) + ["checks"]  # the published keys, then what could mislead (counted)
    n_ties = sum(row["chosen"] == row["rejected"] for row in crb["rows"])
    assert res["checks"] == {"identical_pairs": n_ties, "non_finite_scores": 0, "null_values": 0}
    assert list(res["overall"]) == list(pub["overall"])
    for group in ("by_aspect", "by_language", "by_subset"):
        assert list(res[group]) == sorted(res[group])
        entry_keys = {tuple(v) for v in res[group].values()}
        assert entry_keys == {tuple(v) for v in pub[group].values()} == {("accuracy", "count")}
    for value in res["overall"].values():
        assert value == round(value, 4)

    scores = read_scores(out / "scores.parquet")
    assert list(scores) == ["chosen_score", "rejected_score", "correct", "score_diff", "language", "aspect",
                            "subset", "id"]
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(out / "scores.parquet").metadata[b"pandas"])
    assert meta["index_columns"] == ["id"]
    assert scores["id"] == [r["id"] for r in crb["rows"]]

    # results.json recomputed from scores.parquet
    c, r = np.array(scores["chosen_score"]), np.array(scores["rejected_score"])
    correct = c > r
    assert scores["correct"] == correct.tolist()
    np.testing.assert_array_equal(scores["score_diff"], c - r)
    o = res["overall"]
    assert o["total_examples"] == N_ROWS and o["correct_predictions"] == int(correct.sum())
    assert o["accuracy"] == round(correct.mean(), 4)
    assert o["mean_score_difference"] == round((c - r).mean(), 4)
    assert o["median_score_difference"] == round(float(np.median(c - r)), 4)
    assert o["std_score_difference"] == round((c - r).std(ddof=1), 4)
    for group, column in (("by_aspect", "aspect"), ("by_language", "language"), ("by_subset", "subset")):
        labels = np.array(scores[column])
        expect = {name: {"accuracy": round(correct[labels == name].mean(), 4), "count": int((labels == name).sum())}
                  for name in sorted(set(labels))}
        assert res[group] == expect
    assert set(res["by_language"]) == set(LANGUAGES) and len(res["by_subset"]) == 3

    # a tie (identical responses) is scored identically and counts as wrong
    ties = [i for i, row in enumerate(crb["rows"]) if row["chosen"] == row["rejected"]]
    assert ties and all(c[i] == r[i] and not correct[i] for i in ties)

    # the scores are Scorer.score's on the same texts, at the head of each row's aspect (--head auto)
    heads = [DEFAULT_CRITERIA.index(row["aspect"]) for row in crb["rows"]]
    dc, dr = direct_scores(crb["multi"], crb["rows"], heads, every_head=True)
    take = np.arange(N_ROWS)
    np.testing.assert_allclose(c, dc[take, heads], atol=1e-5, rtol=0)
    np.testing.assert_allclose(r, dr[take, heads], atol=1e-5, rtol=0)
    assert np.abs(dc[:, 0] - c).max() > 1e-3  # (a wrong head would show)

    report = (out / "report.md").read_text()
    for title in ("## Overall", "## By aspect", "## By language", "## By subset", "## Accuracy by aspect and language"):
        assert title in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tie_is_wrong_and_statistics_follow_pandas():
    res = compile_results([1.0, 2.0, 0.5], [1.0, 1.0, 0.25], ["A", "A", "B"], ["x", "y", "x"], ["s", "s", "s"])
    assert res["overall"]["correct_predictions"] == 2 and res["overall"]["accuracy"] == 0.6667
    assert res["overall"]["std_score_difference"] == round(float(np.std([0.0, 1.0, 0.25], ddof=1)), 4)
    assert res["by_aspect"] == {"A": {"accuracy": 0.5, "count": 2}, "B": {"accuracy": 1.0, "count": 1}}


# ------------------------------------------------------------------------------------------ heads, prompts, data
def test_one_head_model_parquet_and_limit(crb, tmp_path):
    res = evaluate(crb, tmp_path / "one", "--limit", 12, model="single", data="parquet")
    assert res["overall"]["total_examples"] == 12
    scores = read_scores(tmp_path / "one" / "scores.parquet")
    assert scores["id"] == [r["id"] for r in crb["rows"][:12]]
    dc, dr = direct_scores(crb["single"], crb["rows"][:12], [0] * 12)
    np.testing.assert_allclose(scores["chosen_score"], dc, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["rejected_score"], dr, atol=1e-5, rtol=0)


def test_head_by_name_and_index(crb, tmp_path):
    by_name = evaluate(crb, tmp_path / "name", "--limit", 8, "--head", "Security_Hardness")
    by_index = evaluate(crb, tmp_path / "index", "--limit", 8, "--head", 4)
    assert by_name == by_index
    a, b = (read_scores(tmp_path / d / "scores.parquet") for d in ("name", "index"))
    assert a == b
    dc, _ = direct_scores(crb["multi"], crb["rows"][:8], [4] * 8)
    np.testing.assert_allclose(a["chosen_score"], dc, atol=1e-5, rtol=0)
    with pytest.raises(crb_eval.EvalError, match="indices 0..4"):
        evaluate(crb, tmp_path / "bad", "--limit", 2, "--head", 5)
    with pytest.raises(crb_eval.EvalError, match="'Style'.*heads: Functional_Correctness"):
        evaluate(crb, tmp_path / "bad", "--limit", 2, "--head", "Style")


def test_aspect_without_a_head_names_the_row(crb, tmp_path):
    rows = make_rows(6)
    rows[3]["aspect"] = "Style"
    data = tmp_path / "odd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [str(crb["multi"]), "--data", str(data), "--output", str(tmp_path / "o"), "--progress=false"]
    with pytest.raises(crb_eval.EvalError, match=r"row 4 \(id 'crb-003'\): aspect 'Style' has no head"):
        crb_eval.run(crb_eval.parse(argv))
    argv[0] = str(crb["single"])  # one head scores every aspect
    assert crb_eval.run(crb_eval.parse(argv))["overall"]["total_examples"] == 6


def test_system_and_aspect_prompts(crb, tmp_path):
    rows = crb["rows"][:6]
    heads = [DEFAULT_CRITERIA.index(r["aspect"]) for r in rows]
    cases = [
        (["--use-system-prompts"], [ALL_CRITERIA_PROMPT] * 6),
        (["--use-aspect-prompts"], [CRITERION_PROMPTS[r["aspect"]] for r in rows]),
    ]
    custom = {a: f"Judge {a.lower()} only." for a in DEFAULT_CRITERIA}
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(custom))
    cases.append((["--use-aspect-prompts", "--criteria-prompts", prompts_file], [custom[r["aspect"]] for r in rows]))
    for k, (flags, systems) in enumerate(cases):
        evaluate(crb, tmp_path / f"p{k}", "--limit", 6, *flags)
        scores = read_scores(tmp_path / f"p{k}" / "scores.parquet")
        dc, dr = direct_scores(crb["multi"], rows, heads, systems)
        np.testing.assert_allclose(scores["chosen_score"], dc, atol=1e-5, rtol=0)
        np.testing.assert_allclose(scores["rejected_score"], dr, atol=1e-5, rtol=0)
    prompts_file.write_text(json.dumps({"Functional_Correctness": "x"}))
    missing = r"row 2 \(id 'crb-001'\): no criterion prompt for aspect 'Runtime_Efficiency'"
    with pytest.raises(crb_eval.EvalError, match=missing):
        evaluate(crb, tmp_path / "p9", "--limit", 6, "--use-aspect-prompts", "--criteria-prompts", prompts_file)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: rows[2].pop("subset"), r"row 3: missing column 'subset'"),
        (lambda rows: rows[1].update(chosen=""), r"row 2, column 'chosen': empty string"),
        (lambda rows: rows[4].update(prompt=17), r"row 5, column 'prompt': expected a string, got int"),
        (lambda rows: rows[3].update(aspect=None), r"row 4: missing column 'aspect'"),
        (lambda rows: rows[5].update(id="crb-001"), r"row 6, column 'id': id 'crb-001' repeats row 2"),
    ],
)
def test_bad_rows_name_file_row_and_column(crb, tmp_path, change, message):
    rows = make_rows(8)
    change(rows)
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=str(data) + ", " + message):
        crb_eval.run(crb_eval.parse([str(crb["multi"]), "--data", str(data), "--output", str(tmp_path / "o")]))


def test_integer_ids_are_an_int64_index(crb, tmp_path):
    rows = make_rows(5)
    for i, r in enumerate(rows):
        r["id"] = 100 + i
    data = tmp_path / "ints.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    crb_eval.run(crb_eval.parse([str(crb["single"]), "--data", str(data), "--output", str(out), "--progress=false"]))
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "scores.parquet")
    assert str(schema.field("id").type) == "int64"
    assert json.loads(schema.metadata[b"pandas"])["columns"][-1]["numpy_type"] == "int64"
    assert read_scores(out / "scores.parquet")["id"] == [100, 101, 102, 103, 104]
    rows[2]["id"] = "x"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 3, column 'id': str id among int ids"):
        crb_eval.run(crb_eval.parse([str(crb["single"]), "--data", str(data), "--output", str(out)]))


def test_cli_errors_exit_2_with_the_message(crb, tmp_path, capsys):
    rows = make_rows(3)
    rows[1]["rejected"] = "   "
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert crb_eval.main([str(crb["multi"]), "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "row 2, column 'rejected': empty string" in capsys.readouterr().err
    assert crb_eval.main(["--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "MODEL is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_an_interruption_scores_only_the_rest(crb, tmp_path, monkeypatch):
    once = tmp_path / "once"
    evaluate(crb, once, "--chunk-size", 8)

    scored = []
    real = Scorer.score_pairs_stream

    def counting(self, batches):
        def counted():
            for batch in batches:
                if fail_after is not None and len(scored) >= fail_after:
                    raise KeyboardInterrupt  # the job is stopped mid-run
                scored.append(len(batch[0]))
                yield batch

        return real(self, counted())

    monkeypatch.setattr(Scorer, "score_pairs_stream", counting)
    out = tmp_path / "resumed"
    fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate(crb, out, "--chunk-size", 8)
    assert not (out / "results.json").exists()
    partial = PartialStore.files(out)
    assert len(partial) == 1 and len(PartialStore.read_all(out)) == 16
    with open(partial[0], "ab") as f:  # a crash in the middle of writing a chunk
        f.write(b'0badc0de {"rows":[["crb-016",0.1')

    fail_after = None
    scored.clear()
    evaluate(crb, out, "--chunk-size", 8, "--resume")
    assert sum(scored) == N_ROWS - 16
    for name in ("results.json", "scores.parquet", "report.md"):
        assert (out / name).read_bytes() == (once / name).read_bytes(), name

    scored.clear()  # resuming a finished run scores nothing and rewrites the same files
    evaluate(crb, out, "--chunk-size", 8, "--resume")
    assert scored == [] and (out / "results.json").read_bytes() == (once / "results.json").read_bytes()

    # a --limit run is another row set: resuming it without the limit is refused (--limit is in the
    # resume key), and its results are gone as soon as a run over other rows starts
    part = tmp_path / "part"
    evaluate(crb, part, "--chunk-size", 8, "--limit", 11)
    scored.clear()
    with pytest.raises(ResumeError, match="limit: 11 then, None now"):
        evaluate(crb, part, "--chunk-size", 8, "--resume")
    assert scored == [] and (part / "results.json").exists()

    # finished rows made with other settings are never mixed in
    with pytest.raises(ResumeError, match="max_length: 4096 then, 2048 now"):
        evaluate(crb, out, "--resume", "--max-length", 2048)
    with pytest.raises(ResumeError, match=r"row 1 \(id 'crb-000'\): scored by the interrupted run with other inputs"):
        evaluate(crb, out, "--resume", "--use-system-prompts")


# ------------------------------------------------------------------------------------------ compare
def test_compare_puts_the_run_on_the_published_leaderboard(crb, tmp_path, capsys):
    if not PUBLISHED.is_dir():
        pytest.skip("../shared/data/crb-published-results is not beside the project")
    other = tmp_path / "other-run"
    evaluate(crb, other, "--limit", 10, model="single")
    out = tmp_path / "run"
    argv = [str(crb["multi"]), "--data", str(crb["jsonl"]), "--output", str(out), "--progress=false",
            "--compare", str(PUBLISHED), str(other), "--name", "tiny-rm"]
    assert crb_eval.main(argv) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    board = report.split("## Leaderboard")[1]
    rows = [line for line in board.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    n_published = sum(1 for d in PUBLISHED.iterdir() if (d / "results.json").is_file())
    assert len(rows) == n_published + 2
    best = min((-json.loads((d / "results.json").read_text())["overall"]["accuracy"], d.name)
               for d in PUBLISHED.iterdir() if (d / "results.json").is_file())
    assert rows[0].split("|")[2].strip() == best[1]
    assert any("**tiny-rm** (this run)" in r for r in rows) and any("| other-run |" in r for r in rows)
    assert "FC = Functional_Correctness" in board and "different numbers of pairs" in board
    assert "**tiny-rm** (this run)" in printed
    with pytest.raises(Exception, match="no such directory"):
        evaluate(crb, tmp_path / "x", "--compare", tmp_path / "missing")


# ------------------------------------------------------------------------------------------ torchrun
def test_a_process_group_the_caller_started_is_left_alone(crb, tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        results = evaluate(crb, tmp_path / "o", "--limit", 4)
        assert results["overall"]["total_examples"] == 4
        assert dist.is_initialized()  # joined, not started: the evaluator does not destroy it
    finally:
        dist.destroy_process_group()


def test_two_torchrun_processes_equal_one(crb, tmp_path):
    single = tmp_path / "single"
    evaluate(crb, single, "--chunk-size", 6)
    multi = tmp_path / "multi"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "themis_engine.eval", str(crb["multi"]), "--data", str(crb["jsonl"]), "--output", str(multi),
           "--device", "cpu", "--chunk-size", "6", "--progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = PartialStore.files(multi)
    assert [f.name for f in files] == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert (multi / "results.json").read_text() == (single / "results.json").read_text()
    a, b = read_scores(multi / "scores.parquet"), read_scores(single / "scores.parquet")
    assert a["id"] == b["id"] and a["correct"] == b["correct"]
    np.testing.assert_allclose(a["chosen_score"], b["chosen_score"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a["rejected_score"], b["rejected_score"], atol=1e-6, rtol=0)
    # one process resumes what two wrote: nothing left to score, the same results
    evaluate(crb, multi, "--chunk-size", 6, "--resume")
    assert (multi / "results.json").read_text() == (single / "results.json").read_text()
