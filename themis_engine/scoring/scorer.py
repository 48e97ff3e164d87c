"""The scorer: chat conversations in, one float32 reward per criterion out.

Conversations are tokenized with the tokenizer's chat template; the K responses to one prompt form
a group whose longest common token prefix is computed once; groups are packed into token-budget
micro-batches (themis_engine.packing) and run through the model under `torch.inference_mode`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from themis_engine import chat, packing
from themis_engine.errors import InputError
from themis_engine.model.decoder import RewardModel
from themis_engine.scoring import budget

logger = logging.getLogger("themis_engine")

Message = dict[str, str]
Conversation = list[Message]
OVERFLOW_POLICIES = chat.OVERFLOW_POLICIES


@dataclass
class ScoreReport:
    """What the last scoring call did (counts, so nothing is lost silently)."""

    sequences: int = 0
    truncated: int = 0  # sequences whose response was cut to max_length (closing tokens kept)
    skipped: int = 0  # sequences not scored (on_overflow="skip"); their rows are NaN
    micro_batches: int = 0
    tokens_computed: int = 0  # tokens in the packed streams (shared prefixes once)
    tokens_standalone: int = 0  # tokens if every sequence ran alone
    # the ids each sequence was scored on, in the call's output row order (None: skipped), so that
    # a user can check exactly what was scored (decode them with the tokenizer)
    ids: list = field(default_factory=list, repr=False)


class Scorer:
    """Scores conversations with a RewardModel; see ARCHITECTURE.md section 4 for the API.

    max_length: the longest standalone sequence (prompt + response, templated) in tokens.
    max_tokens_per_batch: the token budget of one micro-batch. Default: on a CUDA device, measured
    from free memory on the first call (budget.auto_token_budget: the largest budget that fits
    beside the weights); elsewhere budget.default_token_budget. A default budget is raised to the
    largest group of a call when that is larger (with a warning on CUDA); a budget given explicitly
    is never raised and a group over it is an error.
    on_overflow: what to do with a sequence over max_length: "truncate" the response from the right
    keeping the template's closing tokens (default), "skip" it (NaN scores), or raise ("error").
    """

    def __init__(
        self,
        model: RewardModel,
        tokenizer,
        max_length: int = 4096,
        max_tokens_per_batch: int | None = None,
        on_overflow: str = "truncate",
    ):
        if on_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.auto_budget = None  # budget.TokenBudget once measured (CUDA, no budget given)
        self.on_overflow = on_overflow
        self.last_report = ScoreReport()  # what the latest call did (also returned by return_report=True)
        # how from_pretrained was called (its arguments as given), so that an adapter can load the same
        # scorer again in another process (the TRL reward functions pickle as this recipe); None otherwise
        self.load_kwargs: dict | None = None

    @classmethod
    def from_pretrained(
        cls,
        path,
        device=None,
        dtype=None,
        max_length: int = 4096,
        max_tokens_per_batch: int | None = None,
        on_overflow: str = "truncate",
        tokenizer=None,
        quantize: str | None = None,
        offload: str | None = None,
    ) -> "Scorer":
        """Load the model (without an LM head) and the tokenizer files from a local folder.
        quantize="fp8": FP8 block weights (model/fp8.py); offload="layers": the blocks stay in host
        memory and stream to the device one at a time (model/offload.py)."""
        load_kwargs = dict(path=os.fspath(path), device=device, dtype=dtype, max_length=max_length,
                           max_tokens_per_batch=max_tokens_per_batch, on_overflow=on_overflow, tokenizer=tokenizer,
                           quantize=quantize, offload=offload)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None and torch.device(device).type == "cuda":
            dtype = torch.bfloat16
        model = RewardModel.from_pretrained(path, dtype=dtype, device="cpu" if offload else device,
                                            keep_lm_head=False, quantize=quantize)
        if offload is not None:
            from themis_engine.model.offload import apply_offload

            model = apply_offload(model, offload, device)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        scorer = cls(model, tokenizer, max_length, max_tokens_per_batch, on_overflow)
        scorer.load_kwargs = load_kwargs
        return scorer

    @property
    def criteria(self) -> list[str]:
        return self.model.criteria

    # ---------------------------------------------------------------- public scoring methods
    def score(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        """list of chat-message lists (each ending with an assistant turn) -> float32 [N, H]."""
        counts = _OverflowCounts()
        ids = self._tokenize_many(list(conversations), [f"conversation {i}" for i in range(len(conversations))], counts)
        return self._score_groups([[x] for x in ids], counts)[0]

    def score_pairs(self, prompts, chosen, rejected, system=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score (prompt, chosen) and (prompt, rejected); the prompt prefix is computed once per pair.

        prompts: list of str (a user turn) or of message lists (a conversation without the answer);
        chosen, rejected: list of str; system: None, a str for all pairs, or one per pair (None to
        omit). Returns (scores of chosen [N, H], scores of rejected [N, H]), float32.
        """
        n = len(prompts)
        if len(chosen) != n or len(rejected) != n:
            raise InputError(f"score_pairs: {n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
        out = self.score_groups(prompts, [[c, r] for c, r in zip(chosen, rejected)], system=system)
        H = len(self.criteria)
        if not out:
            empty = torch.zeros(0, H, dtype=torch.float32)
            return empty, empty.clone()
        stacked = torch.stack(out)  # [N, 2, H]
        return stacked[:, 0].contiguous(), stacked[:, 1].contiguous()

    def score_groups(self, prompts, completions: Sequence[Sequence[str]], system=None) -> list[torch.Tensor]:
        """K_i completions per prompt, scored with the prompt computed once: list of [K_i, H]."""
        if len(completions) != len(prompts):
            raise InputError(f"score_groups: {len(prompts)} prompts but {len(completions)} completion lists")
        systems = _per_item(system, len(prompts), "system")
        counts = _OverflowCounts()
        groups = []
        for i, (prompt, responses) in enumerate(zip(prompts, completions)):
            if isinstance(responses, str) or not len(responses):
                raise InputError(f"item {i}: completions must be a non-empty list of strings")
            base = _prompt_messages(prompt, systems[i], i)
            groups.append([(base + [{"role": "assistant", "content": r}], f"item {i}, completion {k}")
                           for k, r in enumerate(responses)])
        flat = self._tokenize_many([c for g in groups for c, _ in g], [w for g in groups for _, w in g], counts)
        sizes = [len(g) for g in groups]
        starts = np.cumsum([0] + sizes)
        return self._score_groups([flat[a:b] for a, b in zip(starts[:-1], starts[1:])], counts)[1]

    def score_token_groups(self, prefix_ids, suffix_ids, return_report: bool = False):
        """Pre-tokenized groups: sequence (i, k) is prefix_ids[i] + suffix_ids[i][k]. -> list of [K_i, H].

        For trainers that already hold token ids (no chat template applied here). Over max_length,
        "truncate" keeps the first max_length tokens of the sequence. return_report=True: returns
        (list of [K_i, H], ScoreReport of this call), for callers that share one Scorer between
        threads (the server) and so cannot read `last_report` afterwards.
        """
        if len(prefix_ids) != len(suffix_ids):
            raise InputError(f"score_token_groups: {len(prefix_ids)} prefixes but {len(suffix_ids)} suffix lists")
        groups = []
        counts = _OverflowCounts()
        for i, (p, sufs) in enumerate(zip(prefix_ids, suffix_ids)):
            if not len(sufs):
                raise InputError(f"group {i}: no suffixes")
            group = []
            for k, s in enumerate(sufs):
                seq = list(p) + list(s)
                if not seq:
                    raise InputError(f"group {i}, suffix {k}: empty sequence")
                if len(seq) > self.max_length:
                    seq = self._overflow(seq, f"group {i}, suffix {k}", counts)
                group.append(seq)
            groups.append(group)
        _, per_group, report = self._score_groups(groups, counts)
        return (per_group, report) if return_report else per_group

    def as_trl_reward_funcs(self, **kw) -> list:
        """One TRL reward function per criterion, named after it; one forward pass per batch serves
        them all. Options (criteria, system, cache_size): themis_engine.integrations.trl.reward_funcs."""
        from themis_engine.integrations.trl import reward_funcs

        return reward_funcs(self, **kw)

    # ---------------------------------------------------------------- tokenization
    def tokenize(
        self, conversations: Sequence[Conversation], names: Sequence[str] | None = None
    ) -> list[list[int] | None]:
        """The token ids `score` computes for each conversation: rendered with the tokenizer's chat
        template, encoded, and fitted to max_length per on_overflow (None: skipped; "error" raises).
        names: how errors call each conversation (default "conversation i")."""
        return [None if e is None else e.ids for e in self.encode(conversations, names, spans=False)]

    def encode(
        self, conversations: Sequence[Conversation], names: Sequence[str] | None = None, spans: bool = True
    ) -> list[chat.Encoded | None]:
        """Like `tokenize`, with where the scored answer lies in the ids (chat.Encoded: answer_start,
        closing_start, LM targets, the length before any cut); the one chat path (themis_engine.chat)."""
        convs = list(conversations)
        whats = list(names) if names is not None else [f"conversation {i}" for i in range(len(convs))]
        if len(whats) != len(convs):
            raise InputError(f"tokenize: {len(convs)} conversations but {len(whats)} names")
        return chat.encode(self.tokenizer, convs, self.max_length, self.on_overflow, whats, InputError, spans)

    def _tokenize_many(
        self, convs: list[Conversation], whats: list[str], counts: _OverflowCounts
    ) -> list[list[int] | None]:
        """Template and encode conversations through the chat path (one batched tokenizer call);
        over max_length per on_overflow (None = skipped), counted in `counts`."""
        encoded = chat.encode(self.tokenizer, convs, self.max_length, self.on_overflow, whats, InputError, spans=False)
        for e in encoded:
            counts.skipped += e is None
            counts.truncated += e is not None and e.truncated
        return [None if e is None else e.ids for e in encoded]

    def _overflow(self, ids: list[int], what: str, counts: "_OverflowCounts") -> list[int] | None:
        """A pre-tokenized sequence over max_length (no template to keep: its first tokens stay)."""
        if self.on_overflow == "error":
            raise InputError(f"{what}: {len(ids)} tokens, over max_length={self.max_length}")
        if self.on_overflow == "skip":
            counts.skipped += 1
            return None
        counts.truncated += 1
        return ids[: self.max_length]

    # ---------------------------------------------------------------- the packed forward
    def _score_groups(self, groups, counts: "_OverflowCounts") -> tuple[torch.Tensor, list[torch.Tensor], ScoreReport]:
        """groups: list of lists of token-id lists (None = skipped). -> (flat [num_seqs, H], per group,
        the call's report). `counts`: what the caller's tokenization truncated and skipped."""
        truncated, skipped = counts.truncated, counts.skipped
        H = len(self.criteria)
        sizes = [len(g) for g in groups]
        flat = torch.full((sum(sizes), H), math.nan, dtype=torch.float32)
        # sequences that were skipped leave their rows NaN; a group keeps its other sequences
        kept_groups, kept_index = [], []
        row = 0
        for g in groups:
            live = [(row + k, s) for k, s in enumerate(g) if s is not None]
            if live:
                kept_groups.append([s for _, s in live])
                kept_index.extend(r for r, _ in live)
            row += len(g)
        report = ScoreReport(sequences=row, truncated=truncated, skipped=skipped,
                             ids=[s for g in groups for s in g])
        if kept_groups:
            tokens, seq_offsets, group_offsets = packing.flatten_groups(kept_groups)
            token_budget = self._budget(seq_offsets, group_offsets)
            try:
                batches = packing.plan(tokens, seq_offsets, group_offsets, token_budget)
            except packing.PackingError as err:  # name the caller's item, not the kept-group index
                raise InputError(_rename_group(str(err), kept_groups, groups)) from None
            device = self.model.device
            # rewards stay on the device until the last micro-batch: no host sync inside the loop,
            # so the host prepares and launches batch i+1 while the device computes batch i
            out = torch.empty(len(kept_index), H, dtype=torch.float32, device=device)
            with torch.inference_mode():
                for b in batches:
                    inputs = b.to_torch(device, with_seq_ids=True)
                    seq_ids = inputs.pop("seq_ids")
                    out.index_copy_(0, seq_ids, self.model(**inputs).float())
            flat[torch.as_tensor(kept_index, dtype=torch.long)] = out.cpu()
            report.micro_batches = len(batches)
            report.tokens_computed = sum(b.num_tokens for b in batches)
            report.tokens_standalone = int(seq_offsets[-1])
        self.last_report = report
        if truncated or skipped:
            logger.warning(
                "scored %d sequences: %d truncated to max_length=%d, %d skipped (NaN)",
                row, truncated, self.max_length, skipped,
            )
        return flat, (list(torch.split(flat, sizes)) if sizes else []), report

    def _budget(self, seq_offsets, group_offsets) -> int:
        if self.max_tokens_per_batch is not None:
            return int(self.max_tokens_per_batch)
        lengths = np.diff(seq_offsets)
        largest = int(np.add.reduceat(lengths, group_offsets[:-1]).max())
        if self.model.device.type != "cuda":
            return budget.default_token_budget(largest)
        if self.auto_budget is None:
            self.auto_budget = budget.auto_token_budget(self.model)
        measured = self.auto_budget.tokens
        if largest > measured:
            logger.warning("a group of %d tokens is over the automatic token budget of %d (measured from free "
                           "memory); it runs as one micro-batch and may not fit", largest, measured)
        return max(measured, largest)


@dataclass
class _OverflowCounts:
    """What one call's tokenization did to sequences over max_length."""

    truncated: int = 0
    skipped: int = 0


def _rename_group(message: str, kept_groups, groups) -> str:
    """Packing errors count groups among the kept ones; map the index back to the caller's item."""
    import re

    m = re.match(r"group (\d+) ", message)
    if not m:
        return message
    kept_to_item = [i for i, g in enumerate(groups) if any(s is not None for s in g)]
    item = kept_to_item[int(m.group(1))]
    return f"item {item}: " + message[m.end():]


def _per_item(value, n: int, name: str) -> list:
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise InputError(f"{name}: {len(value)} values for {n} items")
    return value


def _prompt_messages(prompt, system: str | None, i: int) -> Conversation:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        messages = [dict(m) for m in prompt]
        if messages and messages[-1].get("role") == "assistant":
            raise InputError(f"item {i}: the prompt conversation already ends with an assistant turn")
    else:
        raise InputError(f"item {i}: a prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if system is not None:
        if not isinstance(system, str):
            raise InputError(f"item {i}: system must be a string or None")
        messages = [{"role": "system", "content": system}] + messages
    return messages
