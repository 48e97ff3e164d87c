"""The trainer's configuration: typed sections with a help text per field, and the built-in presets.

    python -m themis_engine.train --preset themis-pm --model.path Qwen3-8B --data.train data.jsonl
    python -m themis_engine.train --config run.yaml --optim.lr=5e-6
    python -m themis_engine.train --help
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from themis_engine.config import option, section


@dataclass
class ModelSection:
    """The backbone and its reward heads."""

    path: str = option("", "HF checkpoint folder (*ForCausalLM or *ForSequenceClassification); empty = train "
                           "from scratch with the shape below (the demo)")
    tokenizer: str = option("", "tokenizer folder (default: the model folder)")
    family: str = option("qwen3", "from scratch: decoder family (qwen3, qwen2, llama)")
    hidden_size: int = option(128, "from scratch: hidden size")
    num_layers: int = option(2, "from scratch: blocks")
    num_heads: int = option(4, "from scratch: query heads")
    num_kv_heads: int = option(2, "from scratch: key/value heads")
    head_dim: int = option(32, "from scratch: head dim")
    intermediate_size: int = option(256, "from scratch: MLP width")
    dtype: Literal["bfloat16", "float32"] = option("bfloat16", "compute dtype on CUDA (weights stay float32 "
                                                                 "masters); the CPU always computes in float32")
    activation_checkpointing: Optional[bool] = option(None, "recompute each block in the backward; default: on "
                                                            "for models over 1B parameters")
    compile: bool = option(False, "torch.compile each block")


@dataclass
class DataSection:
    """Training and evaluation data."""

    train: list[str] = option(factory=list, help="training files (JSONL / Parquet) or HF dataset ids")
    eval: list[str] = option(factory=list, help="held-out files; empty = hold out eval_fraction of train")
    eval_fraction: float = option(0.05, "fraction of train held out when no eval files are given")
    schema: Literal["auto", "themis", "crb", "trl"] = option("auto", "row schema")
    columns: dict = option(factory=dict, help="column remapping, e.g. {chosen: better, rejected: worse}")
    on_bad_row: Literal["error", "skip"] = option("error", "a bad row stops the run, or is skipped and counted")
    max_length: int = option(4096, "longest standalone sequence (prompt + response) in tokens")
    cache_dir: str = option("", "tokenization cache folder (default: <output>/cache)")
    synthetic_pairs: int = option(0, "generate this many synthetic code-preference pairs instead of reading "
                                     "files (the demo)")
    seed: int = option(0, "data order and split seed")


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


@dataclass
class TrainConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    objective: ObjectiveSection = section(ObjectiveSection)
    optim: OptimSection = section(OptimSection)
    run: RunSection = section(RunSection)


def _stage(lr, terminal, lm, mu, clip, batch, max_length, epochs):
    return {
        "model": {"dtype": "bfloat16"},
        "data": {"max_length": max_length},
        "objective": {"heads": "scalar", "lm_coef": lm, "magnitude_coef": mu},
        "optim": {"lr": lr, "terminal_lr": terminal, "warmup_fraction": 0.05, "weight_decay": 0.1,
                  "betas": [0.9, 0.95], "eps": 1e-8, "clip": clip},
        "run": {"global_batch_pairs": batch, "epochs": epochs},
    }


# The published Themis-RM recipe (../shared/data/README.md): PT on general preferences, PM on code.
PRESETS: dict[str, dict] = {
    "themis-pt": _stage(2e-5, 1e-5, 0.4, 0.01, 2.0, 1024, 2560, 2),
    "themis-pm": _stage(1e-5, 5e-7, 0.25, 0.001, 1.5, 512, 4096, 1),
    # Runs anywhere in minutes: synthetic code preferences, a small model from scratch, CPU float32.
    "demo": {
        "model": {"path": "", "family": "qwen3", "hidden_size": 96, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 32, "intermediate_size": 192, "dtype": "float32"},
        "data": {"synthetic_pairs": 2400, "eval_fraction": 0.1, "max_length": 512},
        "objective": {"heads": "criteria", "lm_coef": 0.1, "magnitude_coef": 0.001},
        "optim": {"lr": 2e-3, "terminal_lr": 1e-4, "warmup_fraction": 0.05, "weight_decay": 0.1, "clip": 1.0},
        "run": {"output": "runs/demo", "global_batch_pairs": 32, "max_tokens_per_batch": 8192, "epochs": 2,
                "eval_every": 0, "checkpoint_every": 100},
    },
}
