"""One error path for users (issue 16): a bad file, setting or model folder is one line naming the
file, the row/line, the key and what was expected, exit status 2, no traceback (`--debug` or
THEMIS_DEBUG=1 shows it); settings are checked when parsed; a model folder is checked before
anything is scored with it. CPU, tiny files, a few seconds each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from themis_engine.config import ENVIRONMENT, ConfigError, parse_args, run_cli
from themis_engine.errors import CheckpointError, DataError
from themis_engine.model.folder import check_model_folder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the one path
def test_a_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("THEMIS_DEBUG", raising=False)

    def body(argv):
        assert "--debug" not in argv
        raise DataError("data.jsonl, row 3, column 'chosen': expected a string\n  (second line)")

    assert run_cli("themis_engine.x", body, ["--a=1"]) == 2
    err = capsys.readouterr().err
    assert err == "themis_engine.x: error: data.jsonl, row 3, column 'chosen': expected a string | (second line)\n"

    assert run_cli("themis_engine.x", body, ["--debug"]) == 2  # --debug: the traceback too
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("themis_engine.x: error:")

    monkeypatch.setenv("THEMIS_DEBUG", "1")
    assert run_cli("themis_engine.x", body, []) == 2
    assert "Traceback" in capsys.readouterr().err

    monkeypatch.setenv("THEMIS_DEBUG", "maybe")  # a bad value is itself a one-line error naming it
    assert run_cli("themis_engine.x", body, []) == 2
    assert "THEMIS_DEBUG='maybe'" in capsys.readouterr().err

    monkeypatch.delenv("THEMIS_DEBUG")
    assert run_cli("p", lambda argv: None, []) == 0
    assert run_cli("p", lambda argv: (_ for _ in ()).throw(FileNotFoundError(2, "No such file", "x.yaml")), []) == 2
    assert "x.yaml" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli("p", lambda argv: {}["missing"], [])


def test_themis_debug_is_in_the_environment_table_and_the_readme():
    assert "THEMIS_DEBUG" in ENVIRONMENT
    assert "`THEMIS_DEBUG`" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------------------ config files, overrides
def test_malformed_config_files_and_overrides_name_file_line_and_key(tmp_path):
    from themis_engine.train.__main__ import parse_config

    # the help text's own example is YAML flow, not JSON: it parses
    cfg = parse_config(["--preset", "demo", "--data.columns={chosen: better, rejected: worse}"])
    assert cfg.data.columns == {"chosen": "better", "rejected": "worse"}
    assert parse_config(["--preset", "demo", '--data.columns={"chosen": "b"}']).data.columns == {"chosen": "b"}
    assert parse_config(["--preset", "demo", "--optim.betas=[0.8, 0.9]"]).optim.betas == [0.8, 0.9]

    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("run:\n  output: x\n  epochs: [1\n")
    bad_json = tmp_path / "run.json"
    bad_json.write_text('{"run": {"epochs": }}')
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  output: caf\xe9\n")
    cases = [
        (["--data.columns={chosen: ["],
         r"data.columns: cannot read '\{chosen: \[' at character \d+ .*expected a mapping"),
        (["--optim.betas=[0.9,"], r"optim.betas: cannot read .*expected a list"),
        (["--data.columns=[a]"], r"data.columns: expected a mapping, got"),
        ([f"--config={bad_yaml}"], rf"{bad_yaml}, line \d+, column \d+: not valid YAML"),
        ([f"--config={bad_json}"], rf"{bad_json}, line 1, column 20: not valid JSON \(Expecting value\)"),
        ([f"--config={latin}"], rf"{latin}, line 2 \(byte 18\): not UTF-8"),
    ]
    for argv, match in cases:
        with pytest.raises(ConfigError, match=match):
            parse_config(["--preset", "demo", *argv])


# ------------------------------------------------------------------------------------------ settings
TRAIN_NONSENSE = [
    ("--run.global_batch_pairs=0", "run.global_batch_pairs: expected a whole number >= 1, got 0"),
    ("--run.global_batch_pairs=-4", "run.global_batch_pairs: expected a whole number >= 1, got -4"),
    ("--run.max_steps=-3", "run.max_steps: expected a whole number >= 0, got -3"),
    ("--run.epochs=0", r"run.epochs: expected a number > 0 \(or a run.max_steps > 0\), got 0"),
    ("--model.overrides={hidden_size: 0}", "hidden_size=0 \\(expected a whole number >= 1\\)"),
    ("--model.num_heads=0", "num_heads=0 \\(expected a whole number >= 1\\)"),
    ("--model.num_layers=-1", "num_layers=-1 \\(expected a whole number >= 1\\)"),
    ("--model.num_heads=3", "num_heads=3 is not a multiple of num_kv_heads=2"),
    ("--optim.lr=-1e-5", "optim.lr: expected a finite number > 0, got -1e-05"),
    ("--optim.lr=nan", "optim.lr: expected a finite number > 0, got nan"),
    ("--optim.eps=0", "optim.eps: expected a finite number > 0, got 0"),
    ("--optim.betas=[0.9, 1.5]", r"optim.betas: expected a finite number in \[0, 1\), got 1.5"),
    ("--objective.prompt_proportions=[0.5, 0.5, 0.5]", r"summing to 1, got \[0.5, 0.5, 0.5\] \(sum 1.5\)"),
    ("--data.eval_fraction=1", r"data.eval_fraction: expected a finite number in \[0, 1\), got 1"),
    ("--data.columns={answer: better}", "data.columns: 'answer' is not a column name"),
    ("--run.max_tokens_per_batch=100", "run.max_tokens_per_batch=100 is below data.max_length=512"),
    ("--run.device=gpu", "run.device: expected cuda, cuda:N, cpu"),
]


@pytest.mark.parametrize("arg,match", TRAIN_NONSENSE, ids=[a for a, _ in TRAIN_NONSENSE])
def test_train_settings_are_checked_when_parsed(arg, match):
    from themis_engine.train.__main__ import parse_config

    with pytest.raises(ConfigError, match=match):
        parse_config(["--preset", "demo", arg])


def test_the_train_cli_says_it_in_one_line(capsys):
    from themis_engine.train.__main__ import main

    assert main(["--preset", "demo", "--run.global_batch_pairs=0"]) == 2
    assert capsys.readouterr().err == (
        "themis_engine.train: error: run.global_batch_pairs: expected a whole number >= 1, got 0\n")


def test_serve_and_eval_settings_are_checked():
    from themis_engine.eval.config import EvalConfig
    from themis_engine.serve.config import ServeConfig

    for port, ok in ((0, True), (65535, True), (65536, False), (-1, False)):
        cfg = parse_args(ServeConfig, ["m", f"--port={port}"])
        if ok:
            cfg.check()
        else:
            with pytest.raises(ConfigError, match=rf"port: expected a whole number in \[0, 65535\], got {port}"):
                cfg.check()
    with pytest.raises(ConfigError, match="max_query_chars: expected a whole number >= 1, got 0"):
        ServeConfig(model="m", max_query_chars=0).check()
    with pytest.raises(ConfigError, match="--limit: expected a whole number >= 1, got 0"):
        EvalConfig(model="m", data="d", output="o", limit=0).check()


# ------------------------------------------------------------------------------------------ data files
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_data_files_that_cannot_be_read_name_file_line_and_what_was_expected(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from themis_engine.data.tables import read_rows

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["p"] * 50, "chosen": ["a"] * 50}), good)
    blob = good.read_bytes()
    row = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    cases = [
        (_write(tmp_path / "latin1.jsonl", row + b'{"prompt": "caf\xe9"}\n'),
         rf"latin1.jsonl, line 2 \(byte {len(row) + 15} of the file\): not UTF-8 text"),
        (_write(tmp_path / "broken.jsonl", row + b'{"prompt": }\n'),
         r"broken.jsonl, line 2, column 12: not valid JSON \(Expecting value\)"),
        (_write(tmp_path / "list.jsonl", row + b"[1, 2]\n"), r"list.jsonl, line 2: expected a JSON object, got list"),
        (_write(tmp_path / "deep.jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n"), r"deep.jsonl, line 1: nested too"),
        (_write(tmp_path / "rows.csv.parquet", b"prompt,chosen\np,a\n"), r"rows.csv.parquet: not a readable Parquet"),
        (_write(tmp_path / "empty.parquet", b""), r"empty.parquet: not a readable Parquet file \(an empty file"),
        (_write(tmp_path / "cut.parquet", blob[: len(blob) // 2]), r"cut.parquet: not a readable Parquet file"),
        (_write(tmp_path / "bad.json", b'[{"a": 1},\n {"b": }]'), r"bad.json, line 2, column 8: not valid JSON"),
        (_write(tmp_path / "latin1.json", b'[{"a": "\xe9"}]'), r"latin1.json, line 1 \(byte 8\): not UTF-8"),
        (_write(tmp_path / "object.json", b'{"a": 1}'), r"object.json: expected a JSON list of objects, got a dict"),
    ]
    for path, match in cases:
        with pytest.raises(DataError, match=match):
            read_rows(path)
    with_bom = _write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + row)  # a byte-order mark is not an error
    assert read_rows(with_bom)[0]["rejected"] == "b"


def test_a_line_that_is_not_utf8_is_a_counted_skip_under_on_bad_row_skip(tmp_path):
    from themis_engine.data.schemas import load_pairs

    rows = [json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}).encode() + b"\n" for i in range(3)]
    path = _write(tmp_path / "pairs.jsonl", rows[0] + b'{"prompt": "\xff"}\n' + rows[1] + b"{oops\n" + rows[2])
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2 \(byte \d+ of the file\): not UTF-8"):
        load_pairs(path)
    pairs, report = load_pairs(path, on_bad_row="skip")
    assert [p.prompt for p in pairs] == ["p0", "p1", "p2"]
    assert (report.rows, report.kept, report.skipped) == (5, 3, 2)
    assert report.skipped_reasons == {"bad_json": 1, "not_utf8": 1}


def test_the_train_cli_prints_a_data_error_as_one_line(tiny_rm_dir, tmp_path, capsys):
    from themis_engine.train.__main__ import main

    first = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    data = _write(tmp_path / "train.jsonl", first + b'{"prompt": "\xff"}\n')
    argv = ["--model.path=tiny", f"--model.tokenizer={tiny_rm_dir}", f"--data.train={data}",
            "--data.synthetic_pairs=0", "--run.device=cpu", f"--run.output={tmp_path / 'run'}", "--run.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    byte = len(first) + len(b'{"prompt": "')
    assert err.startswith(f"themis_engine.train: error: {data}, line 2 (byte {byte} of the file): not UTF-8 text")


# ------------------------------------------------------------------------------------------ model folders
def _folder(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def _edit_config(**changes):
    def edit(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


def _cut_weights(fraction: float):
    def edit(path: Path):
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * fraction)])
    return edit


def _remove(*names):
    def edit(path: Path):
        for name in names:
            (path / name).unlink()
    return edit


FOLDER_CASES = {
    "truncated safetensors": (_cut_weights(0.5), r"model.safetensors: \d+ bytes, but its header describes \d+ "
                                                 r"\(tensor data cut short\)"),
    "garbage safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"not a safetensors file at all" * 4),
                            r"model.safetensors: not a safetensors file"),
    "empty safetensors": (lambda p: (p / "model.safetensors").write_bytes(b""), r"model.safetensors: 0 bytes, too "
                                                                                r"short"),
    "config.json not JSON": (lambda p: (p / "config.json").write_text('{"vocab_size": 512,\n "x": }'),
                             r"config.json, line 2, column 7: not valid JSON"),
    "config.json a list": (lambda p: (p / "config.json").write_text("[1]"), r"config.json: expected a JSON object"),
    "no tokenizer files": (_remove("tokenizer.json", "tokenizer_config.json"), r"no tokenizer files"),
    "damaged tokenizer.json": (lambda p: (p / "tokenizer.json").write_text('{"version": "1.0", "model": 3}'),
                               r"the tokenizer files \(tokenizer.json\) cannot be loaded"),
    "no chat template": (_remove("chat_template.jinja"), r"the tokenizer has no chat template"),
    "vocabulary over vocab_size": (_edit_config(vocab_size=100), r"the tokenizer has token id \d+ .* but the model's "
                                                                 r"embedding has vocab_size=100 rows"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_model_folder_is_checked_before_loading(tiny_rm_dir, tmp_path, case):
    edit, match = FOLDER_CASES[case]
    path = _folder(tiny_rm_dir, tmp_path / "rm", edit)
    with pytest.raises(CheckpointError, match=match):
        check_model_folder(path)


LOAD_CASES = {
    "truncated safetensors": (_cut_weights(0.5), r"model.safetensors: not a readable safetensors file"),
    "garbage safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"xyz" * 40),
                            r"model.safetensors: not a readable safetensors file"),
    "config.json not JSON": (lambda p: (p / "config.json").write_text("{\n"), r"config.json, line 2, column 1: not "
                                                                              r"valid JSON"),
    "unknown dtype": (_edit_config(dtype="float33"), r"config.json: 'dtype' is 'float33', not a floating-point torch"),
    "3 heads, 2 kv heads": (_edit_config(num_attention_heads=3), r"config.json: num_heads=3 is not a multiple of "
                                                                  r"num_kv_heads=2"),
    "no hidden_size": (lambda p: _edit_config()(p) or _drop_key(p, "hidden_size"), r"config.json: no 'hidden_size'"),
}


def _drop_key(path: Path, key: str) -> None:
    cfg = json.loads((path / "config.json").read_text())
    del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_the_loader_names_the_file_and_the_key(tiny_rm_dir, tmp_path, case):
    import themis_engine as te

    edit, match = LOAD_CASES[case]
    path = _folder(tiny_rm_dir, tmp_path / "rm", edit)
    with pytest.raises(CheckpointError, match=match):
        te.RewardModel.from_pretrained(path)


def test_an_unknown_dtype_argument_names_it(tiny_rm_dir):
    import themis_engine as te

    with pytest.raises(ConfigError, match="dtype 'float33': not a floating-point torch dtype"):
        te.RewardModel.from_pretrained(tiny_rm_dir, dtype="float33")
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        te.RewardModel.from_pretrained(tiny_rm_dir, dtype="int8")


def test_nan_weights_are_a_named_error_at_load(tiny_rm_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    import themis_engine as te

    path = _folder(tiny_rm_dir, tmp_path / "rm")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, :5] = float("nan")
    weights["score.weight"][0, 0] = float("inf")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"2 weight tensor\(s\) hold NaN or inf values \(in float32\): .*"
                                              r"model.layers.1.mlp.up_proj.weight \(5 of 8192\).*score.weight \(1 of"):
        te.RewardModel.from_pretrained(path)
    big = {name: t.double() * (1e45 if name == "score.weight" else 1) for name, t in load_file(
        tiny_rm_dir / "model.safetensors").items()}
    save_file(big, path / "model.safetensors", metadata={"format": "pt"})  # finite in float64, not in float32
    with pytest.raises(CheckpointError, match=r"1 weight tensor\(s\) hold NaN or inf values \(in float32\): "
                                              r"score.weight \(320 of 320\)"):
        te.RewardModel.from_pretrained(path, dtype=torch.float32)


def test_a_given_chat_template_or_tokenizer_passes_the_check(tiny_rm_dir, tmp_path):
    from themis_engine.testing.tiny import CHATML_TEMPLATE

    path = _folder(tiny_rm_dir, tmp_path / "rm", _remove("chat_template.jinja"))
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    tok = check_model_folder(path, chat_template=template)
    assert tok.chat_template == CHATML_TEMPLATE
    assert check_model_folder(path, chat_template=CHATML_TEMPLATE).chat_template == CHATML_TEMPLATE
    assert check_model_folder(path, require_chat_template=False).chat_template is None
    assert check_model_folder(path, tokenizer=tiny_rm_dir).chat_template  # a tokenizer folder of its own
    with pytest.raises(CheckpointError, match="no such file, and not template text"):
        check_model_folder(path, chat_template=tmp_path / "missing.jinja")
    with pytest.raises(CheckpointError, match="the chat template cannot render"):
        check_model_folder(path, chat_template="{{ messages[0]['nope'] + 1 }}")


def test_the_eval_cli_says_a_bad_model_folder_in_one_line(tiny_rm_dir, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from themis_engine.eval.run import main

    path = _folder(tiny_rm_dir, tmp_path / "rm", _remove("tokenizer.json", "tokenizer_config.json"))
    data = tmp_path / "crb.jsonl"
    data.write_text(json.dumps({"id": 1, "prompt": "p", "chosen": "a", "rejected": "b", "aspect": "Runtime_Efficiency",
                                "language": "Python", "subset": "s"}) + "\n")
    assert main([str(path), "--data", str(data), "--output", str(tmp_path / "out"), "--progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"themis_engine.eval: error: {path}: no tokenizer files")


def test_scorer_from_pretrained_checks_the_folder(tiny_rm_dir, tmp_path):
    """Scorer.from_pretrained calls model.folder.check_model_folder (no one-token tokenizer)."""
    import themis_engine as te

    path = _folder(tiny_rm_dir, tmp_path / "rm", _remove("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        te.Scorer.from_pretrained(path, device="cpu")
    path = _folder(tiny_rm_dir, tmp_path / "rm2", _remove("chat_template.jinja"))
    with pytest.raises(CheckpointError, match="no chat template"):
        te.Scorer.from_pretrained(path, device="cpu")
