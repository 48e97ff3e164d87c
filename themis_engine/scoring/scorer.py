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
        # text in: conversations are encoded in chunks (the first of chunk_sequences sequences, then
        # doubling) by a producer thread ahead of the device (pipeline=False: the same chunks in turn)
        self.pipeline = True
        self.chunk_sequences = 32
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
        from themis_engine.model.folder import check_model_folder

        # config.json, the weights' headers, the tokenizer files and chat template: a named error here,
        # never a scorer whose tokenizer encodes every text to one token
        tokenizer = check_model_folder(path, tokenizer)
        model = RewardModel.from_pretrained(path, dtype=dtype, device="cpu" if offload else device,
                                            keep_lm_head=False, quantize=quantize)
        if offload is not None:
            from themis_engine.model.offload import apply_offload

            model = apply_offload(model, offload, device)
        scorer = cls(model, tokenizer, max_length, max_tokens_per_batch, on_overflow)
        scorer.load_kwargs = load_kwargs
        return scorer

    @property
    def criteria(self) -> list[str]:
        return self.model.criteria

    # ---------------------------------------------------------------- public scoring methods
    def score(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        """list of chat-message lists (each ending with an assistant turn) -> float32 [N, H]."""
        convs = list(conversations)
        return self._score_text_groups([[c] for c in convs], [[f"conversation {i}"] for i in range(len(convs))])[0]

    def score_pairs(self, prompts, chosen, rejected, system=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score (prompt, chosen) and (prompt, rejected); the prompt prefix is computed once per pair.

        prompts: list of str (a user turn) or of message lists (a conversation without the answer);
        chosen, rejected: list of str; system: None, a str for all pairs, or one per pair (None to
        omit). Returns (scores of chosen [N, H], scores of rejected [N, H]), float32.
        """
        c, r, _ = next(self.score_pairs_stream([(prompts, chosen, rejected, system)]))
        return c, r

    def score_pairs_stream(self, batches):
        """score_pairs over an iterable of (prompts, chosen, rejected, system) batches, yielding
        (chosen [n, H], rejected [n, H], ScoreReport of the batch) per batch, in order. The pipeline
        runs across the batches: the next batch is encoded while this one runs on the device (the
        evaluator scores its chunks this way). Batches are read from the iterable as needed."""
        def groups():
            for prompts, chosen, rejected, system in batches:
                n = len(prompts)
                if len(chosen) != n or len(rejected) != n:
                    raise InputError(f"score_pairs: {n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
                yield self._groups(prompts, [[c, r] for c, r in zip(chosen, rejected)], system)

        H = len(self.criteria)
        for flat, _, report in self._stream(groups()):
            pairs = flat.view(-1, 2, H)
            yield pairs[:, 0].contiguous(), pairs[:, 1].contiguous(), report

    def score_groups(self, prompts, completions: Sequence[Sequence[str]], system=None) -> list[torch.Tensor]:
        """K_i completions per prompt, scored with the prompt computed once: list of [K_i, H]."""
        return self._score_text_groups(*self._groups(prompts, completions, system))[1]

    def _groups(self, prompts, completions, system) -> tuple[list, list]:
        """(conversation groups, their names): prompt i + each of its completions."""
        if len(completions) != len(prompts):
            raise InputError(f"score_groups: {len(prompts)} prompts but {len(completions)} completion lists")
        systems = _per_item(system, len(prompts), "system")
        groups, names = [], []
        for i, (prompt, responses) in enumerate(zip(prompts, completions)):
            if isinstance(responses, str) or not len(responses):
                raise InputError(f"item {i}: completions must be a non-empty list of strings")
            base = _prompt_messages(prompt, systems[i], i)
            groups.append([base + [{"role": "assistant", "content": r}] for r in responses])
            names.append([f"item {i}, completion {k}" for k in range(len(responses))])
        return groups, names

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
    def _score_text_groups(self, conv_groups, name_groups) -> tuple[torch.Tensor, list[torch.Tensor], ScoreReport]:
        """Conversation groups -> (flat [num_seqs, H], per group, the call's report), through the pipeline."""
        return next(self._stream([(conv_groups, name_groups)]))

    def _stream(self, batches):
        """The text-in pipeline. batches: iterable of (conversation groups, their names); yields
        (flat [num_seqs, H], per group, report) per batch, in order.

        The groups go in chunks of growing size (chunk_sequences sequences, then doubling, up to 16x;
        a chunk never spans two batches); a producer thread renders and encodes the next chunk (the
        chat path; the fast tokenizer's batch call runs on every core) while this thread plans the
        current one and launches its micro-batches; a batch's rewards stay on the device until one
        copy when its last chunk is launched. `self.pipeline = False` runs the same chunks one after
        the other: the same micro-batches, so the same scores bit for bit."""
        def jobs():
            target = self.chunk_sequences
            for conv_groups, name_groups in batches:
                chunks, target = _chunks([len(g) for g in conv_groups], target, 16 * self.chunk_sequences)
                for j, (lo, hi) in enumerate(chunks):
                    yield conv_groups, name_groups, lo, hi, j == len(chunks) - 1

        def encode(job):
            conv_groups, name_groups, lo, hi, last = job
            counts = _OverflowCounts()
            flat = self._tokenize_many([c for g in conv_groups[lo:hi] for c in g],
                                       [w for g in name_groups[lo:hi] for w in g], counts)
            out, at = [], 0
            for g in conv_groups[lo:hi]:
                out.append(flat[at: at + len(g)])
                at += len(g)
            return out, counts, lo, last

        state = _CallState()
        for groups, counts, first, last in _prefetched(jobs(), encode, self.pipeline):
            self._add_chunk(state, groups, counts, first)
            if last:
                yield self._finish(state)
                state = _CallState()

    def _score_groups(self, groups, counts: "_OverflowCounts") -> tuple[torch.Tensor, list[torch.Tensor], ScoreReport]:
        """Token-id groups (None = skipped) -> (flat [num_seqs, H], per group, the call's report)."""
        state = _CallState()
        self._add_chunk(state, groups, counts, 0)
        return self._finish(state)

    def _add_chunk(self, state: "_CallState", groups, counts: "_OverflowCounts", first: int) -> None:
        """Plan one chunk of token-id groups (None = skipped) and launch it (first: the index of its
        first group in the call)."""
        report = state.report
        report.truncated += counts.truncated
        report.skipped += counts.skipped
        base = sum(state.sizes)
        state.sizes.extend(len(g) for g in groups)
        report.ids.extend(s for g in groups for s in g)
        # sequences that were skipped leave their rows NaN; a group keeps its other sequences
        kept_groups, kept_rows = [], []
        row = base
        for g in groups:
            live = [(row + k, s) for k, s in enumerate(g) if s is not None]
            if live:
                kept_groups.append([s for _, s in live])
                kept_rows.extend(r for r, _ in live)
            row += len(g)
        if kept_groups:
            state.launched.append((self._launch(kept_groups, groups, first, report), kept_rows))

    def _finish(self, state: "_CallState") -> tuple[torch.Tensor, list[torch.Tensor], ScoreReport]:
        """One host copy of the call's rewards into the output rows (NaN where skipped)."""
        report, sizes = state.report, state.sizes
        report.sequences = sum(sizes)
        flat = torch.full((report.sequences, len(self.criteria)), math.nan, dtype=torch.float32)
        if state.launched:
            rows = torch.as_tensor([r for _, rs in state.launched for r in rs], dtype=torch.long)
            flat[rows] = torch.cat([out for out, _ in state.launched]).cpu()  # the one host sync of the call
        self.last_report = report
        if report.truncated or report.skipped:
            logger.warning(
                "scored %d sequences: %d truncated to max_length=%d, %d skipped (NaN)",
                report.sequences, report.truncated, self.max_length, report.skipped,
            )
        return flat, (list(torch.split(flat, sizes)) if sizes else []), report

    def _launch(self, kept_groups, groups, first: int, report: ScoreReport) -> torch.Tensor:
        """Plan the kept groups into micro-batches and launch them; the rewards [n_kept, H] stay on
        the device (no host sync: the host prepares batch i+1 while the device computes batch i)."""
        tokens, seq_offsets, group_offsets = packing.flatten_groups(kept_groups)
        token_budget = self._budget(seq_offsets, group_offsets)
        try:
            batches = packing.plan(tokens, seq_offsets, group_offsets, token_budget)
        except packing.PackingError as err:  # name the caller's item, not the kept-group index
            raise InputError(_rename_group(str(err), kept_groups, groups, first)) from None
        device = self.model.device
        out = torch.empty(int(len(seq_offsets) - 1), len(self.criteria), dtype=torch.float32, device=device)
        with torch.inference_mode():
            for b in batches:
                inputs = b.to_torch(device, with_seq_ids=True)
                seq_ids = inputs.pop("seq_ids")
                out.index_copy_(0, seq_ids, self.model(**inputs).float())
        report.micro_batches += len(batches)
        report.tokens_computed += sum(b.num_tokens for b in batches)
        report.tokens_standalone += int(seq_offsets[-1])
        return out

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


@dataclass
class _CallState:
    """What a call has launched so far: the report, each group's size, (device rewards, their rows)."""

    report: ScoreReport = field(default_factory=ScoreReport)
    sizes: list = field(default_factory=list)
    launched: list = field(default_factory=list)


def _chunks(sizes: list[int], target: int, cap: int) -> tuple[list[tuple[int, int]], int]:
    """[lo, hi) group ranges of about `target` sequences, doubling up to `cap` (a small first chunk
    starts the device early, larger ones keep the packing full); and the next chunk's target."""
    out, lo, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= target:
            out.append((lo, i + 1))
            lo, acc, target = i + 1, 0, min(2 * target, cap)
    if lo < len(sizes) or not out:
        out.append((lo, len(sizes)))
    return out, target


def _prefetched(jobs, work, ahead: bool):
    """work(job) for each job, in order; with `ahead`, the next job's work runs on a thread while the
    caller consumes the current result."""
    if not ahead:
        for job in jobs:
            yield work(job)
        return
    from concurrent.futures import ThreadPoolExecutor

    jobs = iter(jobs)
    with ThreadPoolExecutor(1, thread_name_prefix="themis-tokenize") as pool:
        nxt = next(jobs, None)
        pending = pool.submit(work, nxt) if nxt is not None else None
        while pending is not None:
            result = pending.result()
            try:
                nxt = next(jobs, None)
            except BaseException:  # the caller's next batch failed: deliver this result first, then raise
                yield result
                raise
            pending = pool.submit(work, nxt) if nxt is not None else None
            yield result


def _rename_group(message: str, kept_groups, groups, first: int = 0) -> str:
    """Packing errors count groups among the kept ones of a chunk; map the index back to the caller's
    item (`first`: the chunk's first group in the call)."""
    import re

    m = re.match(r"group (\d+) ", message)
    if not m:
        return message
    kept_to_item = [i for i, g in enumerate(groups) if any(s is not None for s in g)]
    item = first + kept_to_item[int(m.group(1))]
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
