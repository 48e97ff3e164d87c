"""Evaluation outputs that cannot be mistaken (issue 16): a run never leaves the results of another
row set in place, the resume key holds --limit and the content (not the size) of the data and the
weights, NaN weights stop the run at load, non-finite scores and identical pairs are counted in
results.json and on the console, and every JSON file written is strict. CPU, one tiny model."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

pytest.importorskip("pyarrow")

from helpers import random_text  # noqa: E402

from themis_engine import DEFAULT_CRITERIA, Scorer  # noqa: E402
from themis_engine.errors import ResumeError  # noqa: E402
from themis_engine.eval import run as crb_eval  # noqa: E402
from themis_engine.eval.partial import PartialStore  # noqa: E402

N_ROWS = 12


def _strict(text: str):
    """json.loads that refuses NaN / Infinity tokens (strict JSON)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _rows(n: int = N_ROWS) -> list[dict]:
    rng = random.Random(7)
    rows = []
    for i in range(n):
        chosen = random_text(rng, 3, 12)
        rows.append({"id": f"r{i:02d}", "prompt": random_text(rng, 3, 10), "chosen": chosen,
                     "rejected": chosen if i in (3, 8) else random_text(rng, 3, 12),  # two ties
                     "aspect": DEFAULT_CRITERIA[i % 5], "language": "Python", "subset": "s"})
    return rows


@pytest.fixture
def setup(tiny_rm_dir, tmp_path):
    model = tmp_path / "rm"
    shutil.copytree(tiny_rm_dir, model)
    data = tmp_path / "crb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return model, data, tmp_path / "out"


def evaluate(model, data, out, *args):
    argv = [str(model), "--data", str(data), "--output", str(out), "--progress=false", "--chunk-size", "4",
            *map(str, args)]
    return crb_eval.run(crb_eval.parse(argv))


# ------------------------------------------------------------------------------------------ row sets
def test_a_run_never_leaves_the_results_of_another_row_set(setup, monkeypatch):
    model, data, out = setup
    evaluate(model, data, out, "--limit", 6)
    assert json.loads((out / "results.json").read_text())["overall"]["total_examples"] == 6

    # --limit is in the resume key: resuming over all rows is refused, naming it
    with pytest.raises(ResumeError, match="limit: 6 then, None now"):
        evaluate(model, data, out, "--resume")

    # a resumed run removes the final files first: interrupted before it writes them, none is left
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crb_eval, "write_scores_parquet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, out, "--limit", 6, "--resume")
    assert not any((out / name).exists() for name in crb_eval.OUTPUT_FILES)
    monkeypatch.undo()
    evaluate(model, data, out, "--limit", 6, "--resume")
    assert json.loads((out / "results.json").read_text())["overall"]["total_examples"] == 6


def test_the_resume_key_holds_the_content_of_the_weights_and_the_data(setup):
    from safetensors.torch import load_file, save_file

    model, data, out = setup
    evaluate(model, data, out, "--limit", 4)
    header = json.loads((PartialStore.files(out)[0].read_bytes().split(b" ", 1)[1]).split(b"\n")[0])
    fp = header["fingerprint"]
    assert fp["limit"] == 4 and fp["data_content"].startswith("crc32:") and fp["chat_template"]
    assert set(fp["model_content"]["model.safetensors"]) == {"header", "data_crc32", "bytes"}
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(fp["model_content"])

    # other weights of the same file size (one head scaled): the sizes alone did not tell
    weights_file = model / "model.safetensors"
    size = weights_file.stat().st_size
    weights = load_file(weights_file)
    weights["score.weight"] *= 1.5
    original = weights_file.read_bytes()
    save_file(weights, weights_file, metadata={"format": "pt"})
    assert weights_file.stat().st_size == size
    with pytest.raises(ResumeError, match=r"model_content\[model.safetensors\]: content changed"):
        evaluate(model, data, out, "--limit", 4, "--resume")
    weights_file.write_bytes(original)

    # the data file changed (one character, the same size)
    text = data.read_text()
    data.write_text(text.replace('"r11"', '"r99"'))
    with pytest.raises(ResumeError, match="data_content: 'crc32:[0-9a-f]{8}' then, 'crc32:[0-9a-f]{8}' now"):
        evaluate(model, data, out, "--limit", 4, "--resume")
    data.write_text(text)
    evaluate(model, data, out, "--limit", 4, "--resume")  # the same content again: resumes


# ------------------------------------------------------------------------------------------ non-finite
def test_nan_weights_stop_the_evaluator_at_load_in_one_line(setup, capsys):
    from safetensors.torch import load_file, save_file

    model, data, out = setup
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert crb_eval.main([str(model), "--data", str(data), "--output", str(out), "--progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "1 weight tensor(s) hold NaN or inf values (in float32): model.norm.weight (1 of 64)" in err
    assert not (out / "results.json").exists()


def test_non_finite_scores_and_ties_are_counted_and_every_json_is_strict(setup, monkeypatch, capsys):
    model, data, out = setup
    real = Scorer.score_pairs_stream

    def with_non_finite(self, batches):
        batches = list(batches)
        for (prompts, _, _, _), (c, r, report) in zip(batches, real(self, batches)):
            for i, p in enumerate(prompts):
                if p == rows[1]["prompt"]:
                    c[i] = float("nan")
                if p == rows[5]["prompt"]:
                    r[i] = float("-inf")
            yield c, r, report

    rows = _rows()
    monkeypatch.setattr(Scorer, "score_pairs_stream", with_non_finite)
    results = evaluate(model, data, out)
    text = (out / "results.json").read_text()
    written = _strict(text)
    assert written == results
    checks = written["checks"]
    assert checks["identical_pairs"] == 2 and checks["non_finite_scores"] == 2
    # the +inf difference makes the mean infinite and the deviation NaN: null in the file, counted
    assert written["overall"]["mean_score_difference"] is None and written["overall"]["std_score_difference"] is None
    assert checks["null_values"] == 2
    assert written["overall"]["total_examples"] == N_ROWS
    for f in PartialStore.files(out):  # the partial files are strict JSON too
        for line in f.read_bytes().splitlines():
            _strict(line.split(b" ", 1)[1].decode())
    console = capsys.readouterr().out
    assert f"note: 2 of {N_ROWS} pairs have chosen == rejected" in console
    assert f"warning: 2 of {N_ROWS} pairs have a non-finite score (NaN or inf)" in console
    assert "warning: 2 values of results.json are null" in console
    report = (out / "report.md").read_text()
    assert "identical pairs" in report and "non-finite scores" in report

    # resuming the finished run reads "nan" / "-inf" back and writes the same files
    monkeypatch.undo()
    first = (out / "scores.parquet").read_bytes()
    evaluate(model, data, out, "--resume")
    assert (out / "results.json").read_text() == text and (out / "scores.parquet").read_bytes() == first
    from themis_engine.eval import read_scores

    scores = read_scores(out / "scores.parquet")
    assert torch.isnan(torch.tensor(scores["chosen_score"][1])) and scores["rejected_score"][5] == float("-inf")


def test_write_results_json_nulls_what_is_not_finite(tmp_path):
    from themis_engine.eval.results import write_results_json

    written = write_results_json({"overall": {"a": float("nan"), "b": 1.0}, "by_x": {"y": [float("inf")]}},
                                 tmp_path / "r.json")
    assert written == {"overall": {"a": None, "b": 1.0}, "by_x": {"y": [None]}, "checks": {"null_values": 2}}
    assert _strict((tmp_path / "r.json").read_text()) == written


def test_bad_data_files_stop_the_evaluator_in_one_line(setup, capsys):
    model, data, out = setup
    deep = data.with_name("deep.jsonl")
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    not_parquet = data.with_name("rows.parquet")
    not_parquet.write_text("id,prompt\n1,p\n")
    for path, message in ((deep, f"{deep}, line 1: nested too deeply"),
                          (not_parquet, f"{not_parquet}: not a readable Parquet file")):
        assert crb_eval.main([str(model), "--data", str(path), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"themis_engine.eval: error: {message}"), err
