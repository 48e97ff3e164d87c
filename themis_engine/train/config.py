"""The trainer's configuration: typed sections with a help text per field, and the built-in presets.

    python -m themis_engine.train --preset themis-pm --model.path Qwen3-8B --data.train data.jsonl
    python -m themis_engine.train --preset demo --model.overrides="{num_layers: 4}"   # a named shape
    python -m themis_engine.train --config run.yaml --optim.lr=5e-6

`model.path` is a checkpoint folder or a named shape (themis_engine.model.args.NAMED_SHAPES) trained
from scratch, and `model.overrides` changes fields of that shape; there is no second list of shape
fields (the earlier --model.hidden_size ... flags are read into model.overrides by the CLI).
    python -m themis_engine.train --help

`TrainConfig.check()` (run when the command line is parsed) checks the values together: sizes and
counts positive, head counts that divide, learning rates finite and positive, proportions that sum
to one; each ConfigError names the key and the value.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from themis_engine.config import ConfigError, check_number, convert, option, section
from themis_engine.data.schemas import check_columns
from themis_engine.model.args import FAMILIES, NAMED_SHAPES, ModelArgs
from themis_engine.model.folder import model_args_problems


class ShapeOverrides(dict):
    """model.overrides: ModelArgs field -> value, applied to a named shape.

    Built from a mapping (a preset, a YAML file) or from a command-line string, YAML flow or JSON
    (`--model.overrides={num_layers: 4, hidden_size: 256}`); every key must be a ModelArgs field the
    trainer does not set itself, and every value is converted to that field's type."""

    def __init__(self, value=(), /):
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError as err:
                raise ConfigError(f"model.overrides: cannot read {value!r} as a mapping ({err})") from None
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"model.overrides: expected a mapping such as {{num_layers: 2}}, got {value!r}")
        super().__init__(value)
        hints = typing.get_type_hints(ModelArgs)
        allowed = [f.name for f in dataclasses.fields(ModelArgs) if f.name not in TRAINER_SET_FIELDS]
        for key in list(self):
            if key not in allowed:
                why = (" (set by the trainer: vocab and pad from the tokenizer, heads from objective)"
                       if key in TRAINER_SET_FIELDS else "")
                raise ConfigError(f"model.overrides: {key!r} is not a shape field{why}; known: {', '.join(allowed)}")
            self[key] = convert(self[key], hints[key], f"model.overrides.{key}")
        if "family" in self and self["family"] not in FAMILIES:
            raise ConfigError(f"model.overrides.family: {self['family']!r} is not one of {', '.join(FAMILIES)}")


# ModelArgs fields the trainer fills in itself (a named shape's values are replaced)
TRAINER_SET_FIELDS = ("vocab_size", "pad_token_id", "criteria", "hf_config")
# The shape flags of the earlier ModelSection (--model.hidden_size=...): still read on the command
# line of `python -m themis_engine.train`, into model.overrides.
LEGACY_SHAPE_FLAGS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size")


@dataclass
class ModelSection:
    """The backbone and its reward heads."""

    path: str = option("tiny", "an HF checkpoint folder (*ForCausalLM or *ForSequenceClassification), or a named "
                               "shape trained from scratch (" + ", ".join(NAMED_SHAPES) + ")")
    overrides: ShapeOverrides = option(factory=ShapeOverrides,
                                       help="named shape only: ModelArgs fields changed, e.g. {num_layers: 4, "
                                            "hidden_size: 256} (vocab and pad come from the tokenizer); the "
                                            "earlier flags --model.hidden_size etc. are read into it")
    tokenizer: str = option("", "tokenizer folder (default: the model folder; for a named shape: built from the "
                                "synthetic data)")
    dtype: Literal["bfloat16", "float32"] = option("bfloat16", "compute dtype on CUDA (weights stay float32 "
                                                                 "masters); the CPU always computes in float32")
    activation_checkpointing: Optional[bool] = option(None, "recompute each block in the backward; default: on "
                                                            "for models over 1B parameters")
    compile: bool = option(False, "torch.compile each block")

    def shape_name(self) -> str | None:
        """The NAMED_SHAPES key `path` names, or None when it is a checkpoint folder. A folder that
        exists wins over a shape of the same name; anything else is a ConfigError."""
        if self.path and Path(self.path).is_dir():
            if self.overrides:
                raise ConfigError(f"model.overrides apply to a named shape; {self.path} is a checkpoint folder "
                                  "(its config.json gives the shape)")
            return None
        key = self.path.lower()
        if key in NAMED_SHAPES:
            return key
        raise ConfigError(f"model.path {self.path!r} is neither a checkpoint folder nor a named shape "
                          f"({', '.join(NAMED_SHAPES)})")

    def shape(self) -> ModelArgs:
        """The named shape with model.overrides applied (vocab, pad and heads still the shape's)."""
        name = self.shape_name()
        if name is None:
            raise ConfigError(f"model.path {self.path!r} is a checkpoint folder, not a named shape")
        return ModelArgs.from_name(name, **self.overrides)

    def check(self) -> None:
        """A folder or a named shape; a named shape with its overrides must be a shape that runs."""
        name = self.shape_name()
        if name is not None:
            problems = model_args_problems(self.shape())
            if problems:
                given = f" with model.overrides {dict(self.overrides)}" if self.overrides else ""
                raise ConfigError(f"model.path {name!r}{given}: " + "; ".join(problems))
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"model.tokenizer: {self.tokenizer!r} is not a folder (expected the tokenizer files' "
                              "folder)")


@dataclass
class DataSection:
    """Training and evaluation data."""

    train: list[str] = option(factory=list, help="training data: JSONL / JSON / Parquet files, folders of them "
                              "(Parquet shards), globs, folders written by datasets' save_to_disk, or Hugging Face "
                              "dataset ids (with `datasets` installed)")
    eval: list[str] = option(factory=list, help="held-out files; empty = hold out eval_fraction of train")
    eval_fraction: float = option(0.05, "fraction of train held out when no eval files are given")
    schema: Literal["auto", "themis", "crb", "trl"] = option("auto", "row schema")
    columns: dict = option(factory=dict, help="column remapping, e.g. {chosen: better, rejected: worse}")
    on_bad_row: Literal["error", "skip"] = option("error", "a bad row stops the run, or is skipped and counted")
    max_length: int = option(4096, "longest standalone sequence (prompt + response) in tokens")
    cache_dir: str = option("", "token store folder (default: <output>/cache); a later run with the same data and "
                                "settings maps the stores found there instead of tokenizing again")
    workers: int = option(0, "processes that tokenize the data on a cache miss (0: every core)")
    synthetic_pairs: int = option(0, "generate this many synthetic code-preference pairs instead of reading "
                                     "files (the demo)")
    seed: int = option(0, "data order and split seed")
    preview: bool = option(True, "at the start, print one training pair as `python -m themis_engine.data preview` "
                                 "shows it: the rendered conversation, shared prefix, chosen and rejected, system "
                                 "prompt, head, cut and LM targets (rank 0; kept with the token store: a restart "
                                 "reads no row)")
    preview_file: bool = option(False, "also write the preview of every row of data.train (JSON lines, the fields of "
                                       "`preview --json`) to <output>/preview.jsonl; tokenizes the rows once more")

    def check(self) -> None:
        check_number("data.eval_fraction", self.eval_fraction, low=0, high=1, high_open=True)
        check_number("data.max_length", self.max_length, low=2, integer=True)
        check_number("data.synthetic_pairs", self.synthetic_pairs, low=0, integer=True)
        check_columns(self.columns, "data.columns")


@dataclass
class ObjectiveSection:
    """Bradley-Terry + LM regularisation + reward magnitude."""

    heads: Literal["criteria", "scalar"] = option("criteria", "criteria: one head per criterion, each pair "
                                                  "trains its aspect's head; scalar: one head with criteria "
                                                  "system prompts assigned at random")
    criteria: list[str] = option(factory=lambda: ["Functional_Correctness", "Runtime_Efficiency", "Memory_Efficiency",
                                                  "Readability_Maintainability", "Security_Hardness"],
                                 help="criterion names (heads in criteria mode)")
    criteria_prompts: str = option("", "JSON/YAML map criterion -> system prompt (default: the project's texts)")
    prompt_proportions: list[float] = option(factory=lambda: [0.15, 0.20, 0.65],
                                             help="scalar mode: fractions of pairs with no prompt, the all-criteria "
                                                  "prompt, their own criterion's prompt")
    lm_coef: float = option(0.0, "lambda: weight of the LM loss on the chosen response (0 = off, LM head unused)")
    magnitude_coef: float = option(0.0, "mu: weight of the reward-magnitude term")
    magnitude: Literal["centering", "abs"] = option("centering", "(r_c + r_r)^2 (paper, TRL) or "
                                                                 "(|r_c| + |r_r|)^2 (Themis training code)")

    def check(self) -> None:
        if not self.criteria:
            raise ConfigError("objective.criteria: expected at least one criterion name, got []")
        for name in self.criteria:
            if not name.strip():
                raise ConfigError(f"objective.criteria: a blank name in {self.criteria!r}")
        repeated = sorted({c for c in self.criteria if self.criteria.count(c) > 1})
        if repeated:
            raise ConfigError(f"objective.criteria: {', '.join(repeated)} given more than once in {self.criteria!r}")
        p = self.prompt_proportions
        if len(p) != 3:
            raise ConfigError(f"objective.prompt_proportions: expected 3 fractions (no prompt, all criteria, own "
                              f"criterion), got {list(p)!r}")
        for value in p:
            check_number("objective.prompt_proportions", value, low=0, high=1)
        if abs(sum(p) - 1.0) > 1e-6:
            raise ConfigError(f"objective.prompt_proportions: expected fractions summing to 1, got {list(p)!r} "
                              f"(sum {sum(p):g})")
        check_number("objective.lm_coef", self.lm_coef, low=0)
        check_number("objective.magnitude_coef", self.magnitude_coef, low=0)


@dataclass
class OptimSection:
    """AdamW with warm-up and cosine decay."""

    lr: float = option(1e-5, "peak learning rate")
    terminal_lr: float = option(5e-7, "learning rate at the end of the cosine")
    warmup_fraction: float = option(0.05, "fraction of steps of linear warm-up")
    weight_decay: float = option(0.1, "AdamW weight decay (not on norms and biases)")
    betas: list[float] = option(factory=lambda: [0.9, 0.95], help="AdamW betas")
    eps: float = option(1e-8, "AdamW eps")
    clip: float = option(1.5, "gradient-norm clipping (0 = off)")

    def check(self) -> None:
        check_number("optim.lr", self.lr, low=0, low_open=True)
        check_number("optim.terminal_lr", self.terminal_lr, low=0)
        check_number("optim.warmup_fraction", self.warmup_fraction, low=0, high=1)
        check_number("optim.weight_decay", self.weight_decay, low=0)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two values (beta1, beta2), got {list(self.betas)!r}")
        for value in self.betas:
            check_number("optim.betas", value, low=0, high=1, high_open=True)
        check_number("optim.eps", self.eps, low=0, low_open=True)
        check_number("optim.clip", self.clip, low=0)


@dataclass
class RunSection:
    """Batches, length and bookkeeping of the run."""

    output: str = option("runs/themis", "output folder (checkpoints, metrics, export)")
    global_batch_pairs: int = option(512, "pairs per optimizer step (all ranks)")
    max_tokens_per_batch: int = option(16384, "token budget of one micro-batch")
    epochs: float = option(1.0, "passes over the training data")
    max_steps: int = option(0, "stop after this many steps (0 = from epochs)")
    eval_every: int = option(0, "evaluate every N steps (0 = at the end only)")
    checkpoint_every: int = option(0, "checkpoint every N steps (0 = at the end only)")
    keep_checkpoints: int = option(2, "checkpoints kept")
    resume: bool = option(False, "continue from the latest checkpoint in output")
    seed: int = option(0, "model init and criteria-prompt seed")
    device: str = option("", "cuda / cpu (default: cuda when present)")
    log_every: int = option(1, "metrics line every N steps")
    progress: bool = option(True, "progress bar on rank 0")
    export: bool = option(True, "write an HF *ForSequenceClassification export at the end")

    def check(self) -> None:
        if not self.output.strip():
            raise ConfigError("run.output: expected an output folder, got ''")
        check_number("run.global_batch_pairs", self.global_batch_pairs, low=1, integer=True)
        check_number("run.max_tokens_per_batch", self.max_tokens_per_batch, low=1, integer=True)
        check_number("run.max_steps", self.max_steps, low=0, integer=True)
        check_number("run.epochs", self.epochs, low=0)
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("run.epochs: expected a number > 0 (or a run.max_steps > 0), got 0")
        for key in ("eval_every", "checkpoint_every"):
            check_number(f"run.{key}", getattr(self, key), low=0, integer=True)
        check_number("run.keep_checkpoints", self.keep_checkpoints, low=1, integer=True)
        check_number("run.log_every", self.log_every, low=1, integer=True)
        check_number("run.seed", self.seed, low=0, integer=True)
        if self.device and not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"run.device: expected cuda, cuda:N, cpu (or empty: cuda when present), got "
                              f"{self.device!r}")


_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+|mps|meta)")


@dataclass
class TrainConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    objective: ObjectiveSection = section(ObjectiveSection)
    optim: OptimSection = section(OptimSection)
    run: RunSection = section(RunSection)

    def check(self) -> None:
        """ConfigError naming the first key (and its value) that cannot work; run when parsed."""
        for part in (self.model, self.data, self.objective, self.optim, self.run):
            part.check()
        if self.run.max_tokens_per_batch < self.data.max_length:
            raise ConfigError(
                f"run.max_tokens_per_batch={self.run.max_tokens_per_batch} is below data.max_length="
                f"{self.data.max_length}: a sequence of data.max_length tokens would not fit a micro-batch"
            )
        if self.optim.terminal_lr > self.optim.lr:
            raise ConfigError(f"optim.terminal_lr={self.optim.terminal_lr:g} is above optim.lr={self.optim.lr:g} "
                              "(the cosine decays from the peak lr to terminal_lr)")


def _stage(*, lr: float, terminal_lr: float, lm_coef: float, magnitude_coef: float, clip: float,
           global_batch_pairs: int, max_length: int, epochs: float) -> dict:
    """One stage of the Themis-RM recipe: scalar heads, bf16, AdamW (0.9, 0.95), warm-up 5% + cosine."""
    return {
        "model": {"dtype": "bfloat16"},
        "data": {"max_length": max_length},
        "objective": {"heads": "scalar", "lm_coef": lm_coef, "magnitude_coef": magnitude_coef},
        "optim": {"lr": lr, "terminal_lr": terminal_lr, "warmup_fraction": 0.05, "weight_decay": 0.1,
                  "betas": [0.9, 0.95], "eps": 1e-8, "clip": clip},
        "run": {"global_batch_pairs": global_batch_pairs, "epochs": epochs},
    }


# The published Themis-RM recipe (../shared/data/README.md): PT on general preferences, PM on code.
PRESETS: dict[str, dict] = {
    "themis-pt": _stage(lr=2e-5, terminal_lr=1e-5, lm_coef=0.4, magnitude_coef=0.01, clip=2.0,
                        global_batch_pairs=1024, max_length=2560, epochs=2),
    "themis-pm": _stage(lr=1e-5, terminal_lr=5e-7, lm_coef=0.25, magnitude_coef=0.001, clip=1.5,
                        global_batch_pairs=512, max_length=4096, epochs=1),
    # Runs anywhere in minutes: synthetic code preferences, the "demo" shape from scratch, CPU float32.
    "demo": {
        "model": {"path": "demo", "dtype": "float32"},
        "data": {"synthetic_pairs": 2400, "eval_fraction": 0.1, "max_length": 512},
        "objective": {"heads": "criteria", "lm_coef": 0.1, "magnitude_coef": 0.001},
        "optim": {"lr": 2e-3, "terminal_lr": 1e-4, "warmup_fraction": 0.05, "weight_decay": 0.1, "clip": 1.0},
        "run": {"output": "runs/demo", "global_batch_pairs": 32, "max_tokens_per_batch": 8192, "epochs": 2,
                "eval_every": 0, "checkpoint_every": 100},
    },
}
