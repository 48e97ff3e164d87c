"""The reward-model trainer: a few small methods around the objective.

    Trainer(cfg).fit()

`train_step` = plan the step's micro-batches -> `forward_backward` each -> clip -> AdamW step.
The pieces it calls live apart: activation checkpointing, compile and FSDP2 (`parallelize.py`), the
optimizer and LR schedule (`optim.py`), checkpoints and their cadence (`checkpoint.CheckpointManager`),
the held-out evaluation (`validate.Validator`) and metrics (`metrics.py`). Under torchrun every rank
reads a disjoint, deterministic share of every global batch; the model is FSDP2-sharded per block
with fp32 master weights and, on CUDA, bf16 compute with fp32 gradient reduction.

`preview_data(cfg)` gives the run's rows as the trainer tokenizes them (the records of
themis_engine.data.preview); `fit` prints one pair that way first (data.preview).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from themis_engine import distributed
from themis_engine.errors import CheckpointError, TrainingError
from themis_engine.model import flops
from themis_engine.model.args import ModelArgs
from themis_engine.model.decoder import RewardModel
from themis_engine.train import microbatch, optim
from themis_engine.train.checkpoint import CheckpointManager
from themis_engine.train.config import TrainConfig
from themis_engine.train.metrics import MetricsLogger
from themis_engine.train.objective import RewardObjective
from themis_engine.train.parallelize import parallelize
from themis_engine.train.prepare import head_names, preview_data, preview_tokenizer, stored_preview  # noqa: F401
from themis_engine.train.validate import Validator

__all__ = ["Trainer", "TrainingError"]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        want_cuda = (cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.mixed = want_cuda and cfg.model.dtype == "bfloat16"
        self.dist = distributed.init(cfg.run.device, need_group=self.mixed)
        self.device = self.dist.device
        self.output = Path(cfg.run.output)
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        self._shape_name = cfg.model.shape_name()  # None: model.path is a checkpoint folder
        self.tokenizer = self._load_tokenizer()
        self.criteria = self._head_names()  # one name per reward head
        # the criteria the data's aspects are matched against (== the heads in criteria mode)
        self.aspects = self.criteria if cfg.objective.heads == "criteria" else list(cfg.objective.criteria)
        self.train_pairs, self.eval_pairs, self.data_report = self._prepare_data()
        self.objective = self._build_model()
        self.optimizer = optim.build_optimizer(self.objective, cfg.optim, fused=self.device.type == "cuda")
        G = cfg.run.global_batch_pairs
        self.total_steps = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * len(self.train_pairs) / G))
        self.step = 0
        self.checkpoints = CheckpointManager(self.output, self.objective, self.optimizer, self.trainer_state,
                                             every=cfg.run.checkpoint_every, keep=cfg.run.keep_checkpoints,
                                             is_main=self.dist.is_main)
        self.validator = Validator(self.objective, self.criteria, self.aspects,
                                   max_tokens_per_batch=cfg.run.max_tokens_per_batch, device=self.device,
                                   rank=self.dist.rank, world=self.dist.world, every=cfg.run.eval_every)
        self._flops_per_token = 3 * flops.linear_flops_per_token(self.args)  # forward + backward
        self._peak = flops.peak_tflops(self.device)

    # ------------------------------------------------------------------ set-up
    @property
    def rm(self) -> RewardModel:
        return self.objective.rm

    @property
    def from_checkpoint(self) -> bool:
        """model.path is a checkpoint folder (else a named shape, trained from scratch)."""
        return self._shape_name is None

    def _load_tokenizer(self):
        from themis_engine.model.folder import check_tokenizer, load_tokenizer

        m = self.cfg.model
        if m.tokenizer or self.from_checkpoint:
            # a folder without tokenizer files, or one whose template cannot render: a named error, never
            # a one-token tokenizer that trains on nothing
            tokenizer = load_tokenizer(m.tokenizer or m.path)
            check_tokenizer(tokenizer, str(m.tokenizer or m.path))
            return tokenizer
        if not self.cfg.data.synthetic_pairs:
            raise TrainingError(f"model.path is the named shape {m.path!r} (train from scratch) but no "
                                "model.tokenizer is given and data.synthetic_pairs is 0: nothing to build a "
                                "tokenizer from")
        return None  # built from the synthetic data in _prepare_data

    def _head_names(self) -> list[str]:
        return head_names(self.cfg)

    def _prepare_data(self):
        """(train store, held-out store, report): token stores built once, mapped by every rank
        (train/prepare.py)."""
        from themis_engine.train.prepare import prepare_data

        train, held, report = prepare_data(self.cfg, self.tokenizer, self.aspects, self.dist, self.output)
        self.tokenizer = report.pop("tokenizer")
        return train, held, report

    def _model_args(self) -> ModelArgs:
        """The named shape with model.overrides; vocab and pad from the tokenizer, one head per criterion."""
        return replace(
            self.cfg.model.shape(), vocab_size=len(self.tokenizer), criteria=tuple(self.criteria),
            pad_token_id=self.tokenizer.pad_token_id,
            hf_config={"bos_token_id": self.tokenizer.bos_token_id, "eos_token_id": self.tokenizer.eos_token_id,
                       "max_position_embeddings": max(4096, self.cfg.data.max_length)},
        )

    def _build_model(self) -> RewardObjective:
        """The reward model (loaded, or a named shape initialised from scratch) in its objective, on
        the device, parallelized (activation checkpointing, compile, FSDP2) as configured."""
        cfg = self.cfg
        with_lm = cfg.objective.lm_coef > 0
        if self.from_checkpoint:
            rm = RewardModel.from_pretrained(cfg.model.path, dtype=torch.float32, device="cpu",
                                             criteria=self.criteria, keep_lm_head=with_lm)
            if with_lm and rm.lm_head is None:
                raise TrainingError(f"{cfg.model.path} is a sequence classifier with no LM head; set "
                                    "objective.lm_coef=0 or start from a *ForCausalLM checkpoint")
        else:
            torch.manual_seed(cfg.run.seed)
            rm = RewardModel(self._model_args(), with_lm_head=with_lm)
            _init_from_scratch(rm)
        self.args = rm.args
        objective = RewardObjective(rm, cfg.objective.lm_coef, cfg.objective.magnitude_coef, cfg.objective.magnitude)
        objective.to(self.device)
        return parallelize(objective, activation_checkpointing=cfg.model.activation_checkpointing,
                           compile=cfg.model.compile, shard=distributed.active() or self.mixed,
                           param_dtype=torch.bfloat16 if self.mixed else torch.float32)

    # ------------------------------------------------------------------ schedule and data order
    def lr_at(self, step: int) -> float:
        """Linear warm-up to the peak, then cosine down to the terminal LR at the last step (optim.lr_at)."""
        return optim.lr_at(step, self.total_steps, self.cfg.optim)

    def global_batch(self, step: int) -> list[int]:
        """The pair indices of global batch `step`: consecutive slices of a seeded permutation per epoch."""
        n, G = len(self.train_pairs), self.cfg.run.global_batch_pairs
        out = []
        for pos in range(step * G, (step + 1) * G):
            epoch, j = divmod(pos, n)
            if epoch not in getattr(self, "_perms", {}):
                self._perms = {epoch: np.random.default_rng([self.cfg.data.seed, epoch]).permutation(n)}
            out.append(int(self._perms[epoch][j]))
        return out

    # ------------------------------------------------------------------ the step
    def forward_backward(self, mb: microbatch.TrainMicroBatch, bt_norm: float, lm_norm: float, weight: float = 1.0):
        """One micro-batch: forward, backward (scaled by `weight`; 0 for the padding micro-batches that
        keep FSDP's collectives in step across ranks). Returns the detached pieces for metrics."""
        inputs = mb.to_torch(self.device)
        loss, bt, lm = self.objective(**inputs, bt_normalizer=bt_norm, lm_normalizer=lm_norm)
        # FSDP averages gradients over ranks; the normalisers are global, so undo the average
        (loss * (weight * self.dist.world)).backward()
        return loss.detach() * weight, bt, (lm.detach() * weight if lm is not None else None)

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        ids = self.global_batch(self.step)
        H = len(self.criteria)
        with_lm = cfg.objective.lm_coef > 0
        bt_norm, lm_norm = microbatch.global_counts(self.train_pairs, ids, H, with_lm)
        mine = ids[self.dist.rank :: self.dist.world]
        mbs = microbatch.build_micro_batches(self.train_pairs, mine, cfg.run.max_tokens_per_batch, H, with_lm)
        n_mb = distributed.all_reduce_max_int(len(mbs), self.device)
        lr = self.lr_at(self.step)
        optim.set_lr(self.optimizer, lr)
        sums = torch.zeros(4 + 3 * H, dtype=torch.float64, device=self.device)
        tokens = 0
        for k in range(n_mb):
            last = k == n_mb - 1
            if hasattr(self.objective, "set_requires_gradient_sync"):
                self.objective.set_requires_gradient_sync(last)
            real = k < len(mbs)
            mb = mbs[k] if real else (mbs[0] if mbs else self._padding_batch())
            loss, bt, lm = self.forward_backward(mb, bt_norm, lm_norm, 1.0 if real else 0.0)
            if real:
                tokens += mb.num_tokens
                sums += _step_sums(loss, bt, lm, cfg.objective.magnitude_coef, H)
        distributed.all_reduce_sum(sums)
        grad_norm = self._clip()
        loss_value = float(sums[0])
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            raise TrainingError(
                f"step {self.step + 1}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} "
                f"(loss {loss_value}, grad norm {grad_norm}); stopping with the last good checkpoint intact"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tok = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        total_tokens = float(distributed.all_reduce_sum(tok)[0])
        dt = time.perf_counter() - t0
        return self._step_metrics(sums, H, lr, grad_norm, total_tokens, len(ids), dt)

    def _clip(self) -> float:
        params = [p for p in self.objective.parameters() if p.grad is not None]
        clip = self.cfg.optim.clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _padding_batch(self) -> microbatch.TrainMicroBatch:
        """A rank with no pair this step still runs one forward/backward (weight 0) so that FSDP's
        collectives match across ranks."""
        H = len(self.criteria)
        return microbatch.build_micro_batches(self.train_pairs, [0], self.cfg.run.max_tokens_per_batch, H,
                                            self.cfg.objective.lm_coef > 0)[0]

    def _step_metrics(self, sums, H, lr, grad_norm, tokens, pairs, dt) -> dict:
        s = sums.tolist()
        m = {"loss": s[0], "bt_loss": s[1], "magnitude_loss": s[2], "lm_loss": s[3], "lr": lr,
             "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "pairs_per_s": pairs / dt, "step_s": dt}
        count, correct, margin = s[4 : 4 + H], s[4 + H : 4 + 2 * H], s[4 + 2 * H : 4 + 3 * H]
        total = sum(count)
        m["accuracy"] = sum(correct) / total if total else float("nan")
        for h, name in enumerate(self.criteria):
            if count[h]:
                m[f"accuracy/{name}"] = correct[h] / count[h]
                m[f"margin/{name}"] = margin[h] / count[h]
        if self._peak:
            m["mfu"] = tokens * self._flops_per_token / dt / (self._peak * 1e12 * self.dist.world)
        return m

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, pairs=None) -> dict:
        """Held-out accuracy per criterion and language (the pair's own head in criteria mode), and the
        reward mean / std of every head over the chosen and rejected responses (validate.Validator);
        `pairs` defaults to the held-out set. Every rank calls it."""
        out = self.validator(self.eval_pairs if pairs is None else pairs)
        if out:
            self.reward_stats = self.validator.reward_stats
        return out

    # ------------------------------------------------------------------ state and export
    def trainer_state(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "torch_rng": torch.get_rng_state().tolist(),
                "config": _jsonable(asdict(self.cfg))}

    def save_checkpoint(self) -> None:
        """Write the checkpoint of the current step now, whatever the cadence."""
        self.checkpoints.save(self.step, force=True)

    def restore(self) -> bool:
        """Continue from the newest checkpoint under run.output that verifies (newer damaged ones are
        logged and skipped); False when there is none, CheckpointError when none verifies."""
        state = self.checkpoints.load()
        if state is None:
            return False
        try:
            self.step = int(state["step"])
            torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"the trainer state (trainer.json) of the checkpoint under {self.output} does "
                                  f"not restore: {type(err).__name__}: {err}") from err
        return True

    def export(self) -> Path:
        """An HF *ForSequenceClassification folder (plus tokenizer files) under <output>/export."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = self.output / "export"
        if self.dist.is_main:
            with torch.device("meta"):
                plain = RewardModel(self.args)
            plain.load_state_dict({k[len("rm."):]: v for k, v in sd.items()
                                   if k.startswith("rm.") and not k.startswith("rm.lm_head.")}, assign=True)
            extra = {"themis_criteria": self.criteria, "themis_heads": self.cfg.objective.heads}
            if getattr(self, "reward_stats", None):
                extra["reward_stats"] = self.reward_stats
            plain.save_pretrained(out, extra_config=extra)
            self.tokenizer.save_pretrained(str(out))
        distributed.barrier()
        return out

    # ------------------------------------------------------------------ the data preview
    def show_preview(self, log: MetricsLogger | None = None) -> list[dict]:
        """Rank 0 at the start of fit: one training pair as `python -m themis_engine.data preview`
        shows it (data.preview: the record prepare_data keeps with the token store, so a restart
        reads no row for it), and with data.preview_file the preview of every row of data.train
        written to <output>/preview.jsonl as it is made (the rows read and tokenized once more).
        Returns the records shown."""
        from themis_engine.data.preview import format_preview, write_jsonl

        cfg = self.cfg
        say = log.message if log is not None else print
        shown: list[dict] = []
        if cfg.data.preview:
            shown = stored_preview(cfg, self.data_report)
            if shown is None:  # no record with the store, or one made for another LM loss or heads
                shown = preview_data(cfg, self.tokenizer, first=1, split="train")
            if shown:
                say("one training pair as the model reads it (--data.preview false: not shown):\n"
                    + format_preview(shown[:1], self.tokenizer, color=sys.stdout.isatty()).rstrip("\n"))
        if cfg.data.preview_file:
            n = write_jsonl(preview_data(cfg, self.tokenizer, first=0, lazy=True), self.output / PREVIEW_FILE)
            say(f"wrote the preview of {n} pairs to {self.output / PREVIEW_FILE}")
        return shown

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to total_steps (first resuming when run.resume), with the evaluations, metrics lines
        and checkpoints their pieces decide on; then the final evaluation and the export.
        Returns {"history": per-step metrics, "final": the final eval/* metrics}."""
        cfg = self.cfg
        resumed = bool(cfg.run.resume) and self.restore()
        log = MetricsLogger(self.output, self.dist.is_main, self.total_steps, cfg.run.progress, self.step)
        if resumed:
            log.message(f"resumed at step {self.step} of {self.total_steps}")
        log.message(f"training {len(self.train_pairs)} pairs ({len(self.eval_pairs)} held out), "
                    f"{self.total_steps} steps of {cfg.run.global_batch_pairs} pairs, criteria {self.criteria}")
        if cfg.data.preview or cfg.data.preview_file:
            if self.dist.is_main:
                self.show_preview(log)
            # the other ranks wait on the CPU (a whole-file preview can take long), not in a collective
            distributed.barrier(distributed.gloo_group(timeout=timedelta(hours=12)))
        self.objective.train()
        history = []
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                if self.validator.due(self.step, self.total_steps):
                    metrics.update(self.evaluate())
                if self.step % max(1, cfg.run.log_every) == 0 or self.step == self.total_steps:
                    log.log(self.step, metrics)
                history.append(metrics)
                self.checkpoints.save(self.step, last_step=self.step == self.total_steps)
            final = self.evaluate()
            log.log_final(self.step, final)  # once: a resumed finished run does not repeat it
            if cfg.run.export:
                log.message(f"exported the reward model to {self.export()}")
        finally:
            log.close()
        return {"history": history, "final": final}


PREVIEW_FILE = "preview.jsonl"


def _step_sums(loss, bt, lm, mu, H):
    """[loss, bt, magnitude, lm, count_h..., correct_h..., margin_sum_h...] of one micro-batch."""
    count = bt.count.double()
    head = torch.stack([loss.double(), bt.bt_loss.double(), bt.magnitude_loss.double(),
                        lm.double() if lm is not None else torch.zeros((), dtype=torch.float64, device=loss.device)])
    correct = torch.nan_to_num(bt.accuracy.double()) * count
    margin = torch.nan_to_num(bt.mean_margin.double()) * count
    return torch.cat([head.to(count.device), count, correct, margin])


def _init_from_scratch(rm: RewardModel) -> None:
    """Normal(0, 0.02) linears and embeddings, unit norms, and a zero reward head (the Themis recipe)."""
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "score.weight" or name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
