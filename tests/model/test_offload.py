"""Layer streaming (themis_engine.model.offload): scores identical to the resident model, at most two
blocks' weights in device buffers, the copy/compute order of double buffering, the Scorer option,
and the large-model benchmark's CPU smoke mode. GPU tests (marked) run the same on CUDA with the
side stream and events."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import conversation, make_checkpoint

import themis_engine as te
from themis_engine import packing
from themis_engine.model.fp8 import quantize_model
from themis_engine.model.offload import BlockBuffer, StreamedRewardModel, stream_layers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("streaming")


def _groups(n: int, seed: int, vocab: int = 512):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(10, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [[p + ids(1, 30) for _ in range(k)] for p, k in ((ids(1, 30), int(torch.randint(1, 4, (1,), generator=g)))
                                                           for _ in range(n))]


def _scores(model, groups, budget=256, device="cpu"):
    tokens, so, go = packing.flatten_groups(groups)
    out = torch.full((len(so) - 1, model.args.num_criteria), math.nan)
    with torch.inference_mode():
        for b in packing.plan(tokens, so, go, budget):  # several micro-batches: several forwards
            out[torch.from_numpy(b.seq_ids)] = model(**b.to_torch(device)).float().cpu()
    return out


def _load(ckpt, **kw):
    return te.RewardModel.from_pretrained(ckpt, dtype=torch.float32, keep_lm_head=False, **kw)


@pytest.mark.parametrize("family,layers", [("qwen3", 3), ("qwen3", 4), ("qwen2", 1), ("llama", 2)])
def test_scores_identical_to_resident(root, family, layers):
    extra = {"hidden_size": 64} if family == "qwen2" else {}
    ckpt = make_checkpoint(root, f"{family}-{layers}", family=family, num_labels=3, num_heads=4, num_kv_heads=2,
                           num_layers=layers, **extra)
    groups = _groups(12, seed=layers)
    ref = _scores(_load(ckpt), groups)
    srm = stream_layers(_load(ckpt), "cpu")
    assert isinstance(srm, StreamedRewardModel) and srm.num_layers == layers
    ours = _scores(srm, groups)
    assert torch.equal(ours, ref)  # exactly: same ops on the same values
    assert torch.equal(_scores(srm, groups), ref)  # again (block 0 prefetched by the last forward)


def test_at_most_two_blocks_resident_and_order(root):
    ckpt = make_checkpoint(root, "order", family="qwen3", num_labels=2, num_heads=4, num_kv_heads=2, num_layers=5)
    srm = stream_layers(_load(ckpt), "cpu")
    # the buffers: exactly two, each one block's tensors
    assert len(srm.block_buffers) == 2 and all(isinstance(b, BlockBuffer) for b in srm.block_buffers)
    block = srm.host_blocks[0]
    block_bytes = sum(t.numel() * t.element_size() for t in block.values())
    assert [b.nbytes for b in srm.block_buffers] == [srm.layout.nbytes] * 2
    assert block_bytes <= srm.layout.nbytes < block_bytes + 256 * len(block)  # 256-byte aligned offsets
    # each block's tensors are views into one host arena (one allocation, one copy per block)
    for arena, tensors in zip(srm.host_arenas, srm.host_blocks):
        lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
        assert all(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for t in tensors.values())
    host_ptrs = {t.data_ptr() for blk in srm.host_blocks for t in blk.values()}
    buf_ptrs = {t.data_ptr() for b in srm.block_buffers for t in b.tensors.values()}
    assert not host_ptrs & buf_ptrs

    # every block computes from a buffer's tensors, never from the host copy
    seen = []
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
             for layer in srm.rm.model.layers]
    traces = []
    for seed in (1, 2):  # two forwards (one micro-batch each)
        srm.trace = []
        _scores(srm, _groups(6, seed=seed), budget=4096)
        traces.append(srm.trace)
    for h in hooks:
        h.remove()
    assert seen and set(seen) <= buf_ptrs

    # replay the trace: a copy never lands in the buffer being computed on, each compute finds its
    # block in its buffer, and at most two blocks are resident at any step
    holding = {0: None, 1: None}
    computed = []
    for kind, layer, buf in traces[0] + traces[1]:
        if kind == "copy":
            holding[buf] = layer
        else:
            assert holding[buf] == layer
            computed.append(layer)
        assert len({v for v in holding.values() if v is not None}) <= 2
    assert computed == list(range(5)) * 2
    # double buffering: block i+1 is copied before block i computes (so a GPU overlaps them)
    first, second = traces
    assert first[:4] == [("copy", 0, 0), ("copy", 1, 1), ("compute", 0, 0), ("copy", 2, 0)]
    assert first[-2:] == [("copy", 0, 1), ("compute", 4, 0)]  # the last step prefetches block 0
    # so the second forward starts computing at once: no copy of block 0 in it
    assert second[:2] == [("copy", 1, 0), ("compute", 0, 1)]
    assert len([t for t in second if t[0] == "copy"]) == 5 and len(first) == 11
    assert sorted(srm.resident_layers()) == [0, 4]


def test_fp8_and_streaming_compose(root):
    ckpt = make_checkpoint(root, "fp8", family="qwen3", num_labels=5, num_heads=4, num_kv_heads=2, num_layers=3)
    groups = _groups(8, seed=5)
    ref = _scores(_load(ckpt, quantize="fp8"), groups)
    rm = _load(ckpt)
    quantize_model(rm)
    assert torch.equal(_scores(stream_layers(rm, "cpu"), groups), ref)


def test_scorer_offload_option(root):
    tok_ckpt = make_checkpoint(root, "scorer", family="qwen3", num_labels=5, num_heads=4, num_kv_heads=2, num_layers=3)
    convs = [conversation(f"write function {i}", "def f(x):\n    return x" * (i % 4 + 1)) for i in range(7)]
    resident = te.Scorer.from_pretrained(tok_ckpt, device="cpu", dtype=torch.float32, max_tokens_per_batch=300)
    streamed = te.Scorer.from_pretrained(tok_ckpt, device="cpu", dtype=torch.float32, max_tokens_per_batch=300,
                                         offload="layers")
    assert isinstance(streamed.model, StreamedRewardModel) and streamed.criteria == resident.criteria
    assert torch.equal(streamed.score(convs), resident.score(convs))
    both = te.Scorer.from_pretrained(tok_ckpt, device="cpu", dtype=torch.float32, quantize="fp8", offload="layers")
    fp8 = te.Scorer.from_pretrained(tok_ckpt, device="cpu", dtype=torch.float32, quantize="fp8")
    assert torch.equal(both.score(convs), fp8.score(convs))
    with pytest.raises(ValueError, match="offload"):
        te.Scorer.from_pretrained(tok_ckpt, device="cpu", offload="disk")


def test_large_models_bench_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("large_models", ROOT / "bench" / "large_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--cpu", "--json", str(tmp_path / "r.json")])
    assert out["fp8"]["preference_agreement"] > 0.8 and out["fp8"]["score_correlation"] > 0.9
    assert out["streaming"]["max_abs_diff"] == 0.0
    assert out["bf16"]["tokens_per_s"] > 0 and (tmp_path / "r.json").is_file()


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_streamed_equals_resident(root):
    ckpt = make_checkpoint(root, "gpu", family="qwen3", num_labels=5, num_heads=4, num_kv_heads=2, num_layers=5,
                           hidden_size=128, intermediate_size=256, head_dim=32)
    groups = _groups(40, seed=7)
    dev = torch.device("cuda")
    resident = te.RewardModel.from_pretrained(ckpt, dtype=torch.bfloat16, device=dev, keep_lm_head=False)
    ref = _scores(resident, groups, budget=512, device=dev)
    srm = stream_layers(te.RewardModel.from_pretrained(ckpt, dtype=torch.bfloat16, keep_lm_head=False), dev)
    assert all(t.is_pinned() for blk in srm.host_blocks for t in blk.values())
    assert all(t.is_cuda for b in srm.block_buffers for t in b.tensors.values())
    assert srm.rm.score.weight.is_cuda and srm.rm.model.embed_tokens.weight.is_cuda
    ours = _scores(srm, groups, budget=512, device=dev)
    # same kernels on the same values: expected bit-equal; allow bf16 noise in case cuBLAS picks
    # another algorithm for other addresses (both sides' tensors are 256-byte aligned)
    diff = (ours - ref).abs().max().item()
    print(f"\nstreamed vs resident on the GPU: max |diff| {diff:.3g} (std {ref.std().item():.3g})")
    assert diff <= 0.02 * ref.std().item()
    # on a side stream: the copies must not run on the compute stream
    assert srm.copy_stream is not None and srm.copy_stream != torch.cuda.current_stream()
