"""Token budgets: how many packed tokens one scoring micro-batch may hold.

The one default rule (`default_token_budget`), used by the Scorer, the server and the evaluator
when no budget is given (off CUDA): DEFAULT_TOKENS_PER_BATCH, or the largest group when that is
larger (a group is never split). A budget given explicitly is never raised.

On a GPU the budget that fits beside the weights is measured, not guessed: one probe forward pass
of `probe_tokens` tokens (segments of `probe_segment` tokens, random ids) gives the peak activation
bytes per token over the memory already allocated, and the budget is `fraction` of the memory the
process can still take (the driver's free memory plus what the caching allocator holds unused) over
that, rounded down to a multiple of 1024 and capped. Attention on the packed stream is O(T) in
memory (the Triton kernel), so bytes per token do not grow with the budget; the PyTorch reference
attention is quadratic per segment, which is why the probe uses segments of a realistic length.

    budget = themis_engine.scoring.budget.auto_token_budget(model)        # CUDA only
    budget.tokens, budget.bytes_per_token, budget.available_bytes

The Scorer calls this once, lazily, when no max_tokens_per_batch was given and the model is on CUDA.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import numpy as np
import torch

from themis_engine import packing
from themis_engine.errors import MemoryBudgetError

logger = logging.getLogger("themis_engine")

GRANULE = 1024  # budgets are multiples of this
DEFAULT_CAP = 131072  # beyond this, bigger micro-batches buy nothing (and int32 offsets stay far away)
DEFAULT_FRACTION = 0.85  # of the memory left, the rest is slack for the allocator's fragmentation
DEFAULT_TOKENS_PER_BATCH = 16384  # the default budget where none is given or measured


def default_token_budget(largest_group: int = 0) -> int:
    """The default micro-batch token budget: DEFAULT_TOKENS_PER_BATCH, or `largest_group` (the
    unique tokens of the largest group to place; for a server, its max_length) when larger."""
    return max(DEFAULT_TOKENS_PER_BATCH, int(largest_group))


@dataclass(frozen=True)
class TokenBudget:
    tokens: int  # the token budget of one micro-batch
    bytes_per_token: float  # measured peak activation bytes per packed token
    available_bytes: int  # memory the process could still take when measured
    probe_tokens: int  # size of the probe micro-batch


def budget_from(bytes_per_token: float, available_bytes: int, *, fraction: float = DEFAULT_FRACTION,
                cap: int = DEFAULT_CAP, granule: int = GRANULE) -> int:
    """fraction * available / bytes_per_token, rounded down to `granule`, at most `cap`.
    Raises MemoryBudgetError when that is under one granule."""
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    tokens = int(fraction * max(int(available_bytes), 0) / bytes_per_token) // granule * granule
    if tokens < granule:
        raise MemoryBudgetError(
            f"only {available_bytes / 2**30:.2f} GiB of device memory left; at {bytes_per_token / 1024:.1f} KiB "
            f"of activations per token not even {granule} tokens fit (free memory, or use offload='layers' "
            "or quantize='fp8')"
        )
    return min(int(cap), tokens)


def probe_batch(vocab_size: int, tokens: int, segment: int, seed: int = 0) -> packing.PackedBatch:
    """A micro-batch of `tokens` random ids in unshared segments of `segment` tokens (the last one
    shorter), one score row per segment."""
    if tokens < 1 or segment < 1:
        raise ValueError(f"probe_batch: tokens and segment must be positive, got {tokens}, {segment}")
    rng = np.random.default_rng(seed)
    lengths = [segment] * (tokens // segment) + ([tokens % segment] if tokens % segment else [])
    groups = [[rng.integers(0, vocab_size, n).tolist()] for n in lengths]
    flat = packing.flatten_groups(groups)
    (batch,) = packing.plan(*flat, tokens)
    return batch


def available_bytes(device: torch.device) -> int:
    """Memory this process can still take on `device`: the driver's free bytes plus the bytes the
    caching allocator reserved but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def activation_bytes_per_token(model, batch: packing.PackedBatch, device: torch.device) -> float:
    """Peak bytes over the memory allocated before, per token, of one inference forward on `batch`."""
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        out = model(**batch.to_torch(device))
        del out
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - base, 1) / batch.num_tokens


def auto_token_budget(model, *, probe_tokens: int = 8192, probe_segment: int = 2048,
                      fraction: float = DEFAULT_FRACTION, cap: int = DEFAULT_CAP) -> TokenBudget:
    """The token budget for `model` on its CUDA device (see the module's docstring)."""
    device = model.device
    if device.type != "cuda":
        raise ValueError(f"auto_token_budget measures CUDA memory; the model is on {device}")
    batch = probe_batch(model.args.vocab_size, probe_tokens, probe_segment)
    per_token = activation_bytes_per_token(model, batch, device)
    torch.cuda.empty_cache()
    avail = available_bytes(device)
    tokens = budget_from(per_token, avail, fraction=fraction, cap=cap)
    budget = TokenBudget(tokens=tokens, bytes_per_token=per_token, available_bytes=avail, probe_tokens=probe_tokens)
    logger.info("token budget %d (auto: %.1f KiB of activations per token, %.1f GiB available on %s)",
                tokens, per_token / 1024, avail / 2**30, device)
    return budget
