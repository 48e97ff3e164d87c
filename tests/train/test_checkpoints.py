"""Nothing lost, nothing silent: checkpoints, metrics and the export under kills and damage (CPU, tiny).

* a damaged newest checkpoint (truncated model.pt, empty optim.pt, cut trainer.json, a missing file,
  64 flipped bytes, no manifest) is skipped with a warning and the run resumes from the previous
  one, bit-identical to an uninterrupted run; with none that verifies, a CheckpointError;
* a verified checkpoint that does not load (unpicklable content, another model) is a CheckpointError;
* SIGKILL at random points of writing, re-writing and pruning never leaves a `step_*` folder that
  does not verify, and the next start removes the leftovers;
* metrics.jsonl: a torn last line and the lines past the resume step are dropped (the file cut or
  replaced whole, never emptied), the final line is written once;
* the export's files get the umask's permissions.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from themis_engine.config import apply
from themis_engine.errors import CheckpointError
from themis_engine.train import checkpoint
from themis_engine.train.checkpoint import CheckpointManager, latest, step_folders, verify
from themis_engine.train.config import TrainConfig
from themis_engine.train.metrics import MetricsLogger
from themis_engine.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]

SMALL = {  # test_trainer.py's run: 4 steps of 12 pairs on a 2-block model
    "model": {"path": "tiny", "overrides": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                            "head_dim": 8, "intermediate_size": 64}, "dtype": "float32"},
    "data": {"synthetic_pairs": 48, "eval_fraction": 0.25, "max_length": 256},
    "objective": {"heads": "criteria", "lm_coef": 0.1, "magnitude_coef": 0.01},
    "optim": {"lr": 3e-3, "terminal_lr": 3e-4, "clip": 1.0},
    "run": {"global_batch_pairs": 12, "max_tokens_per_batch": 1024, "max_steps": 4, "progress": False,
            "device": "cpu", "checkpoint_every": 1, "keep_checkpoints": 4, "export": False},
}


def _cfg(output, **run) -> TrainConfig:
    cfg = apply(TrainConfig(), SMALL)
    cfg.run.output = str(output)
    for key, value in run.items():
        setattr(cfg.run, key, value)
    return cfg


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}


def _lines(output):
    return [json.loads(x) for x in (Path(output) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the same numbers for every run here, and far faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run (losses, weights), and a run stopped after step 3 with the
    checkpoints of steps 1, 2 and 3 (a folder to copy)."""
    root = tmp_path_factory.mktemp("ckpt")
    full = Trainer(_cfg(root / "full", checkpoint_every=0))
    losses = [m["loss"] for m in full.fit()["history"]]
    stopped = Trainer(_cfg(root / "stopped"))
    for _ in range(3):
        stopped.train_step()
        stopped.save_checkpoint()
    return {"losses": losses, "weights": _weights(full), "stopped": root / "stopped"}


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model.pt": lambda d: _truncate(d / "model.pt", (d / "model.pt").stat().st_size // 2),
    "empty optim.pt": lambda d: _truncate(d / "optim.pt", 0),
    "cut trainer.json": lambda d: _truncate(d / "trainer.json", (d / "trainer.json").stat().st_size // 2),
    "missing model.pt": lambda d: (d / "model.pt").unlink(),
    "64 flipped bytes in model.pt": lambda d: _flip(d / "model.pt"),
    "missing manifest": lambda d: (d / "manifest.json").unlink(),
}
REASON = {"truncated model.pt": "model.pt has", "empty optim.pt": "optim.pt has 0 bytes",
          "cut trainer.json": "trainer.json has", "missing model.pt": "model.pt is missing",
          "64 flipped bytes in model.pt": "model.pt does not match its sha256", "missing manifest": "no manifest"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(reference, tmp_path, kind, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference["stopped"], out)
    newest = out / "checkpoints" / "step_000003"
    DAMAGE[kind](newest)
    assert verify(newest) is not None and verify(out / "checkpoints" / "step_000002") is None
    assert latest(out).name == "step_000002"
    with caplog.at_level(logging.WARNING, logger="themis_engine.train.checkpoint"):
        resumed = Trainer(_cfg(out, resume=True))
        rest = resumed.fit()["history"]
    skipped = [r.getMessage() for r in caplog.records if "step_000003 skipped" in r.getMessage()]
    assert skipped and REASON[kind] in skipped[0], skipped
    assert resumed.step == 4 and len(rest) == 2  # steps 3 and 4 again, from step 2
    assert [m["loss"] for m in rest] == reference["losses"][2:]
    assert all(torch.equal(v, reference["weights"][k]) for k, v in _weights(resumed).items())
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000001", "step_000002", "step_000003", "step_000003.damaged", "step_000004"]
    assert all(verify(p) is None for _, p in step_folders(out))


def test_no_checkpoint_that_verifies_is_a_named_error(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference["stopped"], out)
    for (_, p), kind in zip(step_folders(out), ["empty optim.pt", "missing manifest", "64 flipped bytes in model.pt"]):
        DAMAGE[kind](p)
    assert latest(out) is None
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* verifies.*step_000003: model.pt does not "
                                              r"match.*step_000002: no manifest.*step_000001: optim.pt has 0"):
        Trainer(_cfg(out, resume=True)).fit()
    fresh = Trainer(_cfg(tmp_path / "fresh", resume=True))  # no checkpoint at all: starts from step 0
    assert fresh.restore() is False and fresh.step == 0


def _rewrite_manifest(folder):
    """Make the manifest match the files as they are now (a checkpoint that verifies but may not load)."""
    man = json.loads((folder / "manifest.json").read_text())
    man["files"] = {name: {"size": (folder / name).stat().st_size, "sha256": checkpoint._sha256(folder / name)}
                    for name in man["files"]}
    (folder / "manifest.json").write_text(json.dumps(man))
    assert verify(folder) is None


class Unpicklable:  # torch.load(weights_only=True) refuses it
    pass


def test_verified_checkpoint_that_does_not_load_is_a_named_error(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    manager = CheckpointManager(tmp_path, model, opt, lambda: {"step": 1}, every=1)
    folder = manager.save(1)
    assert verify(folder) is None and manager.load()["step"] == 1
    torch.save({"weight": Unpicklable()}, folder / "model.pt")
    _rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match=r"step_000001/model.pt does not load \(UnpicklingError"):
        manager.load()
    other = torch.nn.Linear(5, 2)  # another shape
    folder = CheckpointManager(tmp_path / "b", other, torch.optim.AdamW(other.parameters()), dict, every=1).save(1)
    with pytest.raises(CheckpointError, match=r"step_000001: the saved model/optimizer state does not fit"):
        CheckpointManager(tmp_path / "b", model, opt, dict).load()
    (folder / "trainer.json").write_text("[1, 2")
    _rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match=r"trainer.json does not read"):
        CheckpointManager(tmp_path / "b", model, opt, dict).load()


def test_trainer_state_that_does_not_restore_is_a_named_error(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference["stopped"], out)
    folder = out / "checkpoints" / "step_000003"
    state = json.loads((folder / "trainer.json").read_text())
    del state["torch_rng"]
    (folder / "trainer.json").write_text(json.dumps(state))
    _rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match=r"trainer.json.*does not restore: KeyError"):
        Trainer(_cfg(out, resume=True)).restore()


# ----------------------------------------------------------------------------------- kills
_WRITER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from themis_engine.train.checkpoint import CheckpointManager

def work(out, steps=None):  # resume from the newest checkpoint, then write (every 2nd step twice) and prune
    model = torch.nn.Linear(384, 384)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"step": 0}
    manager = CheckpointManager(out, model, opt, lambda: dict(state), every=1, keep=2)
    state["step"] = (manager.load() or {"step": 0})["step"]
    while steps is None or state["step"] < steps:
        model(torch.randn(2, 384)).sum().backward()
        opt.step()
        state["step"] += 1
        manager.save(state["step"])
        if state["step"] % 2 == 0:
            manager.save(state["step"], force=True)

work(sys.argv[1] + "_warm", steps=3)  # the lazy imports (torch._dynamo, ...) done before the forks
work(sys.argv[1] + "_warm", steps=4)
print("ready", flush=True)
while sys.stdin.readline():  # one writer per line, killed by the test
    pid = os.fork()
    if pid == 0:
        try:
            work(sys.argv[1])
        finally:
            os._exit(0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_sigkill_while_writing_and_pruning_never_leaves_a_damaged_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    rng = random.Random(0)
    model = torch.nn.Linear(384, 384)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    leftovers, steps = 0, []
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(24):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.02, 0.4))
            os.kill(pid, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "reaped"
            folders = step_folders(out)
            for _, p in folders:  # every folder that looks complete is complete
                assert verify(p) is None, (p, verify(p))
            found = latest(out)
            assert (found is None) == (not folders)
            if found is not None:
                assert checkpoint.load(found, model, opt)["step"] == int(found.name[5:])
                steps.append(int(found.name[5:]))
            root = out / "checkpoints"
            leftovers += root.is_dir() and any(p.name.startswith(".") for p in root.iterdir())
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    assert steps and steps == sorted(steps) and steps[-1] >= 12, steps  # each writer went on from the last
    assert leftovers, "no kill landed inside a write or a prune"
    CheckpointManager(out, model, opt, dict)  # a start removes what the kills left
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resave_and_prune_rename_before_they_delete(tmp_path, monkeypatch):
    """Stopped right after the old folder is renamed away: no `step_*` folder is incomplete."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    manager = CheckpointManager(tmp_path, model, opt, lambda: {"step": 2}, every=1, keep=1)
    manager.save(1)
    manager.save(2)
    assert [p.name for _, p in step_folders(tmp_path)] == ["step_000002"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill between the renames and the delete

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, force=True)  # re-save: old renamed to trash, new renamed in, then the delete
    assert [p.name for _, p in step_folders(tmp_path)] == ["step_000002"] and verify(tmp_path / "checkpoints" /
                                                                                     "step_000002") is None
    monkeypatch.undo()
    assert any(p.name.startswith(".trash.") for p in (tmp_path / "checkpoints").iterdir())
    CheckpointManager(tmp_path, model, opt, dict)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]


# ----------------------------------------------------------------------------------- metrics
def _write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_metrics_torn_line_and_lines_past_the_resume_step(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [{"step": s, "loss": float(s)} for s in range(1, 6)], tail='{"step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="themis_engine.train.metrics"):
        log = MetricsLogger(tmp_path, True, 8, progress=False, resume_step=3)
    text = caplog.text
    assert "torn last line" in text and "dropping 2 lines after step 3" in text
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3] and not log.final_written
    log.log(4, {"loss": 4.0})
    log.log_final(4, {"eval/accuracy": 0.5})
    log.log_final(4, {"eval/accuracy": 0.5})  # once
    assert [(r["step"], r.get("final", False)) for r in _lines(tmp_path)] == [(1, False), (2, False), (3, False),
                                                                              (4, False), (4, True)]
    # lines past the step not all at the end (an older writer's order): replaced whole, by a rename
    _write_lines(path, [{"step": 1}, {"step": 4}, {"step": 2}, {"step": 3}])
    (tmp_path / ".metrics.jsonl.dead.tmp").write_text("{}")  # a kill during an earlier rewrite
    MetricsLogger(tmp_path, True, 8, progress=False, resume_step=2)
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2] and not list(tmp_path.glob(".metrics*"))
    caplog.clear()
    path.write_text("")  # emptied by an earlier version's rewrite: the loss is said
    with caplog.at_level(logging.WARNING, logger="themis_engine.train.metrics"):
        MetricsLogger(tmp_path, True, 8, progress=False, resume_step=2)
    assert "metrics of steps 1..2" in caplog.text


def test_resumed_runs_keep_one_history_and_one_final_line_and_export_umask_permissions(reference, tmp_path, caplog):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        t = Trainer(_cfg(out, checkpoint_every=2, keep_checkpoints=2, export=True))
        t.fit()
        first = _lines(out)
        assert [(r["step"], bool(r.get("final"))) for r in first] == [(1, False), (2, False), (3, False),
                                                                       (4, False), (4, True)]
        assert [r["loss"] for r in first[:4]] == reference["losses"]
        # killed after the final line (say during the export): a resume does not repeat it
        (out / "export" / ".model.safetensors.abc.tmp").write_bytes(b"half")
        Trainer(_cfg(out, checkpoint_every=2, keep_checkpoints=2, export=True, resume=True)).fit()
        assert _lines(out) == first
        assert not (out / "export" / ".model.safetensors.abc.tmp").exists()
        files = sorted(p for p in (out / "export").iterdir())
        assert {"model.safetensors", "config.json"} <= {p.name for p in files} and len(files) > 3
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert set(modes.values()) == {"0o644"}, modes
        # the step-4 checkpoint damaged, a torn line appended: back to step 2, one history, one final line
        DAMAGE["truncated model.pt"](out / "checkpoints" / "step_000004")
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "loss"')
        with caplog.at_level(logging.WARNING):
            Trainer(_cfg(out, checkpoint_every=2, keep_checkpoints=2, resume=True)).fit()
        assert "torn last line" in caplog.text and "dropping 3 lines after step 2" in caplog.text
        again = _lines(out)
        assert [(r["step"], bool(r.get("final"))) for r in again] == [(s, f) for s, f in
                                                                        [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1)]]
        assert [r["loss"] for r in again[:4]] == reference["losses"]
        assert {k: v for k, v in again[-1].items()} == first[-1]
    finally:
        os.umask(old)
