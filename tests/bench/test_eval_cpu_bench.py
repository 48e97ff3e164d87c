"""bench/eval_cpu.py's smoke run: the three sides on a tiny model, the engine's scores equal the
transformers loop's, the table and the JSON; and its documented command lines parse."""

from __future__ import annotations

import json
import re

import pytest
from bench_scripts import load

SMALL = ["--tokenizer", "tiny", "--pairs", "5", "--batch-size", "2", "--hidden-size", "32", "--num-layers", "1",
         "--num-heads", "4", "--num-kv-heads", "1", "--head-dim", "16", "--intermediate-size", "64",
         "--prompt-tokens", "10-30", "--answer-tokens", "5-40", "--repeats", "1", "--warmup", "0"]


def test_eval_cpu_smoke(capsys, tmp_path):
    out_json = tmp_path / "eval_cpu.json"
    res = load("eval_cpu").main(SMALL + ["--json", str(out_json)])
    out = capsys.readouterr().out
    assert out.lstrip().startswith("CRB evaluator on the CPU vs a transformers loop | card: cpu | torch ")
    assert "command: python bench/eval_cpu.py --tokenizer tiny --pairs 5" in out
    sides = res["sides"]
    assert list(sides) == ["engine", "reference", "transformers"]
    assert sides["engine"]["attention"] == "sdpa" and sides["reference"]["attention"] == "reference"
    for side in ("engine", "reference"):
        assert sides[side]["max_abs_diff"] < 1e-4, side  # the same scores as transformers'
        assert f"| {sides[side]['label']} | {sides[side]['attention']} |" in out
    assert all(s["pairs_per_s"] > 0 for s in sides.values())
    tokens = res["tokens_per_pair"]
    assert tokens["engine"] < tokens["standalone"] <= tokens["transformers"]  # shared prompts; padding
    assert json.loads(out_json.read_text())["sides"]["transformers"]["label"].startswith("transformers")


def test_eval_cpu_fails_on_different_scores(capsys, monkeypatch):
    """A wrong engine does not pass unnoticed: exit status 1 after the table."""
    mod = load("eval_cpu")
    real = mod.run_transformers
    monkeypatch.setattr(mod, "run_transformers",
                        lambda *a: {k: (c + 1e-3, r) for k, (c, r) in real(*a).items()})
    with pytest.raises(SystemExit) as info:
        mod.main(SMALL + ["--sides", "engine,transformers"])
    assert info.value.code == 1
    assert "scores differ from transformers'" in capsys.readouterr().err


def test_eval_cpu_command_lines_parse():
    mod = load("eval_cpu")
    text = mod.__doc__.replace("\\\n", " ")
    commands = re.findall(r"python bench/eval_cpu\.py([^\n]*?)(?:\s+#.*)?$", text, flags=re.M)
    assert len(commands) >= 3
    for argv in commands:
        assert mod.parse_args(argv.split()) is not None, argv
    with pytest.raises(SystemExit):
        mod.parse_args(["--sides", "engine,nope"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--prompt-tokens", "300-100"])
