"""bench/_harness.py, the one timing harness, and the command lines of the bench scripts on the one
config system (every flag that bench/gpu_check.sh and the README type still parses)."""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest
import torch
from bench_scripts import ROOT, SCRIPTS, harness, load

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ timing
def test_benchmark_warms_up_then_times_each_repetition():
    h = harness()
    calls = []
    t = h.benchmark(lambda: calls.append(1), CPU, warmup=2, repeats=5)
    assert len(calls) == 7 and t.reps == 5 and len(t.times_s) == 5
    assert t.median_s == sorted(t.times_s)[2] and t.median_ms == pytest.approx(t.median_s * 1e3)
    # target_ms adapts the count on CUDA only; on the CPU it is `repeats` after the warm-up
    calls.clear()
    t = h.benchmark(lambda: calls.append(1), CPU, warmup=1, repeats=3, target_ms=1000.0, max_repeats=50)
    assert len(calls) == 4 and t.reps == 3


def test_benchmark_median_is_of_the_repetitions():
    h = harness()
    import time

    delays = iter([0.0, 0.03, 0.001, 0.001])  # the warm-up call, then three repetitions

    t = h.benchmark(lambda: time.sleep(next(delays)), CPU, warmup=1, repeats=3)
    assert max(t.times_s) >= 0.03 and t.median_s < 0.02  # one slow repetition does not move the median


def test_memory_helpers_off_cuda():
    h = harness()
    h.reset_peak_memory(CPU)
    assert math.isnan(h.peak_memory_gib(CPU)) and h.peak_extra_gib(lambda: None, CPU) is None
    assert h.peak_tflops(CPU) is None and h.peak_tflops(CPU, 123.0) == 123.0


# ------------------------------------------------------------------------------------------ output
def test_environment_and_header():
    h = harness()
    env = h.environment(CPU, "throughput.py", ["--cpu", "--json", "a b.json"])
    for key in ("date", "commit", "card", "torch", "triton", "transformers", "python", "command", "timing"):
        assert key in env, key
    assert env["card"] == "cpu" and env["torch"] == torch.__version__
    assert env["command"] == "python bench/throughput.py --cpu --json 'a b.json'"
    text = h.header("scoring throughput", env, "model: tiny", "")
    first, second = text.splitlines()
    assert first.startswith("scoring throughput | card: cpu | torch ") and first.endswith("| model: tiny")
    assert f"transformers {env['transformers']}" in first and f"commit {env['commit']}" in first
    assert second.startswith("command: python bench/throughput.py --cpu") and "timing: perf_counter" in second


def test_markdown_table():
    h = harness()
    text = h.markdown_table(["side", "s", "note"], [["engine", "1.00", None], ["hf", 2, "x"]])
    assert text.splitlines() == ["| side | s | note |", "| --- | --- | --- |", "| engine | 1.00 |  |", "| hf | 2 | x |"]


def test_write_json_is_strict_and_whole(tmp_path):
    h = harness()
    path = tmp_path / "sub" / "r.json"
    h.write_json(path, {"nan": float("nan"), "inf": float("inf"), "dtype": torch.bfloat16, "rows": [(1, 2.5)]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nan": None, "inf": None, "dtype": "torch.bfloat16", "rows": [[1, 2.5]]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left
    h.write_json(None, {"x": 1})  # no --json: nothing written, no error


def test_the_scripts_share_the_harness():
    """No script keeps its own timer, environment probe or JSON writer."""
    for name in SCRIPTS:
        text = (ROOT / "bench" / f"{name}.py").read_text()
        assert "import _harness as harness" in text, name
        for own in ("times.append(", "torch.cuda.Event(", "elapsed_time(", "argparse", "json.dump(",
                    "statistics.median", '"rev-parse"'):
            assert own not in text, (name, own)


# ------------------------------------------------------------------------------------------ command lines
def _commands(text: str, python: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of every `<python> bench/<script>.py ...` command in a shell or markdown text."""
    text = text.replace("\\\n", " ")
    out = []
    for m in re.finditer(rf"{re.escape(python)} bench/(\w+)\.py([^\n`#;|]*)", text):
        argv = shlex.split(m.group(2).replace('"$LOGS/', '"/tmp/logs/'))
        out.append((m.group(1), argv))
    return out


def test_every_documented_command_line_parses():
    """The flags gpu_check.sh, the README and the scripts' own docstrings type, as typed there."""
    found = _commands((ROOT / "bench" / "gpu_check.sh").read_text(), "python3")
    found += _commands((ROOT / "README.md").read_text(), "python")
    for name in SCRIPTS:
        found += _commands(load(name).__doc__, "python")
    scripts = {s for s, _ in found}
    assert {"throughput", "kernel_ops", "large_models", "attention_sweep"} <= scripts, scripts
    assert any("--max-tokens-per-batch" in a and "auto" in a for _, a in found)
    for script, argv in found:
        if "--help" not in argv:
            assert load(script).parse_args(argv) is not None, (script, argv)

def test_throughput_flags_as_typed():
    tp = load("throughput")
    cfg = tp.parse_args(["--mode", "train", "--model", "qwen3-8b", "--steps", "2", "--global-batch", "32",
                         "--optimizer", "sgd", "--hf-micro-pairs", "1", "--max-tokens-per-batch", "16384",
                         "--skip-baseline", "--json", "/tmp/x.json"])
    assert (cfg.mode, cfg.model, cfg.steps, cfg.global_batch, cfg.optimizer) == ("train", "qwen3-8b", 2, 32, "sgd")
    assert cfg.hf_micro_pairs == 1 and cfg.max_tokens_per_batch == 16384 and cfg.skip_baseline and not cfg.cpu
    cfg = tp.parse_args(["--fp8", "--max-tokens-per-batch", "auto", "--peak-tflops=500", "--repeats=2"])
    assert cfg.fp8 and cfg.max_tokens_per_batch == "auto" and cfg.peak_tflops == 500.0 and cfg.repeats == 2
    assert tp.parse_args([]).max_tokens_per_batch == 32768 and tp.parse_args([]).repeats is None


def test_throughput_yaml_config(tmp_path):
    tp = load("throughput")
    path = tmp_path / "run.yaml"
    path.write_text("mode: train\nsteps: 3\ntie: 'no'\nmax_tokens_per_batch: 8192\n")
    cfg = tp.parse_args(["--config", str(path), "--steps", "5"])  # the flag wins over the file
    assert (cfg.mode, cfg.steps, cfg.tie, cfg.max_tokens_per_batch) == ("train", 5, "no", 8192)


@pytest.mark.parametrize("argv, message", [
    (["--max-tokens-per-batch", "0"], "must be positive"),
    (["--max-tokens-per-batch", "many"], "max_tokens_per_batch"),
    (["--mode", "train", "--max-tokens-per-batch", "auto"], "is for --mode score"),
    (["--mode", "train", "--fp8"], "--fp8 is for --mode score"),
    (["--mode", "serve"], "not one of score, train"),
    (["--model", "qwen9-1t"], "not a built-in shape"),
    (["--batch-sizes", "4"], "unknown option --batch-sizes"),
])
def test_throughput_bad_options_exit_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        load("throughput").parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python bench/throughput.py: error: ") and message in err, err


def test_other_scripts_flags_as_typed(capsys):
    k = load("kernel_ops")
    cfg = k.parse_args(["--cpu", "--only", "bt_loss,blocks", "--no-flex", "--budget-s", "20"])
    assert cfg.cpu and cfg.only == ["bt_loss", "blocks"] and cfg.no_flex and cfg.budget_s == 20.0
    assert (cfg.repeat_ms, cfg.min_reps, cfg.max_reps) == (0.0, 1, 1)  # the --cpu repetition defaults
    cfg = k.parse_args(["--full", "--quick"])
    assert (cfg.repeat_ms, cfg.min_reps, cfg.max_reps) == (200.0, 5, 100)
    with pytest.raises(SystemExit):
        k.parse_args(["--only", "copy,warp"])
    assert "unknown sections ['warp']" in capsys.readouterr().err
    lm = load("large_models")
    cfg = lm.parse_args(["--model", "qwen3-14b", "--streaming-only", "--stream-layers", "4", "--fast-accum",
                         "--skip-fp8", "--max-tokens-per-batch", "2048"])
    assert cfg.streaming_only and cfg.stream_layers == 4 and cfg.fast_accum and cfg.max_tokens_per_batch == 2048
    with pytest.raises(SystemExit):
        lm.parse_args(["--repeats", "0"])
    sw = load("attention_sweep")
    cfg = sw.parse_args(["--static", "--arch", "80", "--head-dim", "64"])
    assert cfg.static and cfg.arch == 80 and cfg.head_dim == 64 and not cfg.cpu
    with pytest.raises(SystemExit) as info:
        sw.parse_args(["--head-dim", "x"])
    assert info.value.code == 2 and "head_dim" in capsys.readouterr().err


@pytest.mark.parametrize("script, fields", [
    ("throughput", ("--mode", "--max_tokens_per_batch", "--skip_baseline", "--hf_micro_pairs", "--tie")),
    ("kernel_ops", ("--cpu", "--only", "--budget_s", "--no_flex")),
    ("large_models", ("--streaming_only", "--stream_budget", "--fast_accum")),
    ("attention_sweep", ("--head_dim", "--static", "--arch")),
])
def test_help_has_a_line_per_field(script, fields, capsys):
    mod = load(script)
    with pytest.raises(SystemExit) as info:
        mod.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python bench/{script}.py")
    lines = out.splitlines()
    for field in fields:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {field} ("))
        assert lines[at + 1].startswith("      ") and len(lines[at + 1].strip()) > 10, field  # its help text
