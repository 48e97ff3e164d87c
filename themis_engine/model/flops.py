"""FLOP counts for MFU, counting each unique token once (shared prefixes once, no padding)."""

from __future__ import annotations

import torch

from themis_engine.model.args import ModelArgs

# Dense bf16 peak (datasheet) by a substring of torch.cuda.get_device_name().
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1}


def linear_flops_per_token(args: ModelArgs) -> float:
    """Forward FLOPs (2 per multiply-add) of every matmul of the decoder blocks, per token."""
    d, hd = args.hidden_size, args.head_dim
    attn = d * hd * (args.num_heads + 2 * args.num_kv_heads) + args.num_heads * hd * d
    mlp = 3 * d * args.intermediate_size
    return 2.0 * args.num_layers * (attn + mlp)


def attention_flops(args: ModelArgs, batches) -> float:
    """Forward FLOPs of QK^T and PV over exactly the (query, key) pairs the mask keeps, all layers.
    `batches`: PackedBatch-like objects with cu_seqlens and prefix_len."""
    pairs = 0.0
    for b in batches:
        seg = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).astype("float64")
        p = b.prefix_len.astype("float64")
        pairs += float((seg * p + seg * (seg + 1) / 2).sum())
    return 4.0 * args.num_layers * args.num_heads * args.head_dim * pairs


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in name), None)
