"""Loading and saving: round trips with transformers, and checkpoints that must be refused."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import conversation, hf_scores, make_checkpoint, random_text
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import themis_engine as te
from themis_engine.model.hf_checkpoint import CheckpointError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def _convs(n=5, seed=0):
    rng = random.Random(seed)
    return [conversation(random_text(rng, 2, 15), random_text(rng, 1, 30)) for _ in range(n)]


def test_engine_export_loads_in_transformers(root):
    src = make_checkpoint(root, "src", family="qwen3", num_labels=5, num_heads=4, num_kv_heads=2,
                          criteria=list(te.DEFAULT_CRITERIA))
    rm = te.RewardModel.from_pretrained(src, dtype=torch.float32)
    assert rm.criteria == list(te.DEFAULT_CRITERIA)
    out = root / "exported"
    rm.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForSequenceClassification"]
    assert cfg["num_labels"] == 5 and cfg["problem_type"] == "regression"
    assert cfg["id2label"]["0"] == "Functional_Correctness" and cfg["label2id"]["Security_Hardness"] == 4
    assert "pad_token_id" in cfg
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind
    scorer = te.Scorer(rm, te.Scorer.from_pretrained(src).tokenizer)
    convs = _convs()
    ours = scorer.score(convs)
    ids = [scorer.tokenize([c])[0] for c in convs]
    theirs = hf_scores(out, ids)
    assert (ours - theirs).abs().max().item() < 1e-5
    hf = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert hf.config.id2label[4] == "Security_Hardness"


def test_sharded_export_round_trips(root):
    src = make_checkpoint(root, "shard-src", family="llama", num_labels=2)
    rm = te.RewardModel.from_pretrained(src, dtype=torch.float32)
    out = root / "sharded"
    rm.save_pretrained(out, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    back = te.RewardModel.from_pretrained(out, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(rm.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    ids = [[5, 6, 7, 8, 9]]
    assert (hf_scores(out, ids) - hf_scores(src, ids)).abs().max() < 1e-6


def test_causal_lm_checkpoint_gets_zero_head_and_keeps_lm_head(root):
    src = make_checkpoint(root, "causal", head="causal", family="qwen3", tie_word_embeddings=False)
    rm = te.RewardModel.from_pretrained(src, dtype=torch.float32, criteria=["a", "b", "c"])
    assert rm.criteria == ["a", "b", "c"]
    assert rm.score.weight.shape == (3, 64) and torch.count_nonzero(rm.score.weight) == 0
    lm = load_file(str(src / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(rm.lm_head.weight, lm)
    tied = make_checkpoint(root, "causal-tied", head="causal", family="qwen3", tie_word_embeddings=True)
    rt = te.RewardModel.from_pretrained(tied, dtype=torch.float32)
    assert rt.criteria == ["reward"]
    assert rt.lm_head.weight is rt.model.embed_tokens.weight
    no_lm = te.RewardModel.from_pretrained(src, keep_lm_head=False)
    assert no_lm.lm_head is None


def test_transformers_causal_to_engine_to_transformers(root):
    """A base model gets a head, is exported, and transformers reproduces the engine's scores."""
    src = make_checkpoint(root, "causal2", head="causal", family="qwen2", num_heads=4, head_dim=16, hidden_size=64)
    rm = te.RewardModel.from_pretrained(src, dtype=torch.float32, criteria=2)
    with torch.no_grad():
        rm.score.weight.normal_()
    out = root / "causal2-rm"
    rm.save_pretrained(out)
    scorer = te.Scorer(rm, AutoTokenizer.from_pretrained(str(src)))
    convs = _convs(3, seed=4)
    ids = [scorer.tokenize([c])[0] for c in convs]
    assert (scorer.score(convs) - hf_scores(out, ids)).abs().max() < 1e-5


def test_pickle_checkpoint_is_refused(root):
    d = root / "pickle"
    d.mkdir()
    src = make_checkpoint(root, "for-pickle", family="qwen3")
    (d / "config.json").write_text((src / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle.*pytorch_model\.bin.*safe_serialization=True"):
        te.RewardModel.from_pretrained(d)


def test_unsupported_architecture_lists_supported(root):
    src = make_checkpoint(root, "arch", family="qwen3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MistralForSequenceClassification"]
    (src / "config.json").write_text(json.dumps(cfg))
    expected = r"MistralForSequenceClassification.*Qwen3ForSequenceClassification.*LlamaForCausalLM"
    with pytest.raises(CheckpointError, match=expected):
        te.RewardModel.from_pretrained(src)


def test_missing_and_misshaped_tensors_are_listed(root):
    src = make_checkpoint(root, "broken", family="qwen3", num_labels=2)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        te.RewardModel.from_pretrained(src)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "model.layers.0.self_attn.k_proj.weight: (3, 3)" in msg and "mis-shaped" in msg


def test_no_weights_and_not_a_folder(root, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        te.RewardModel.from_pretrained(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        te.RewardModel.from_pretrained(tmp_path)


def test_dtype_follows_request(root):
    src = make_checkpoint(root, "dtype", family="llama")
    rm = te.RewardModel.from_pretrained(src, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in rm.parameters())
    assert rm.inv_freq.dtype == torch.float32


def test_casting_a_model_keeps_its_rotary_frequencies_float32(root):
    """rm.to(torch.bfloat16) casts every floating buffer; the rotary frequencies are recomputed in
    float32, so a cast model scores as one loaded in bf16."""
    src = make_checkpoint(root, "cast", family="qwen3", num_labels=2)
    loaded = te.RewardModel.from_pretrained(src, dtype="bfloat16")
    cast = te.RewardModel.from_pretrained(src, dtype="float32").to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.float32 and torch.equal(cast.inv_freq, loaded.inv_freq)
    ids = [list(range(3, 40)), list(range(50, 300))]
    a = te.Scorer(loaded, tokenizer=None).score_token_groups([[]], [ids])[0]
    b = te.Scorer(cast, tokenizer=None).score_token_groups([[]], [ids])[0]
    assert torch.equal(a, b)


_RSS_PROBE = r"""
import resource, sys, torch
import themis_engine as te
torch.zeros(1, device="cuda")  # the CUDA context, before the measurement
with open("/proc/self/statm") as f:  # the resident set now (not the peak so far, which could hide growth)
    before = int(f.read().split()[1]) * resource.getpagesize() // 1024
rm = te.RewardModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device="cuda", quantize=sys.argv[2] or None)
torch.cuda.synchronize()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, rm.score.weight.device)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["", "fp8"])
def test_gpu_load_keeps_host_memory_to_about_one_shard(tmp_path, quantize):
    """Loading straight to the GPU: the process's peak host memory grows by about one shard (the
    file mapped while it is read), not by the model."""
    import subprocess
    import sys

    args = te.ModelArgs(family="qwen3", vocab_size=4096, hidden_size=1024, intermediate_size=3072, num_layers=8,
                        num_heads=8, num_kv_heads=4, head_dim=128, criteria=("a", "b"))
    torch.manual_seed(0)
    rm = te.RewardModel(args).to(torch.bfloat16)  # ~100M parameters, 200 MiB in bf16
    shard = 40 * 2**20
    rm.save_pretrained(tmp_path / "m", max_shard_bytes=shard)
    total = sum(p.numel() * p.element_size() for p in rm.parameters())
    assert len(list((tmp_path / "m").glob("*.safetensors"))) >= 5
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "m"), quantize],
                         capture_output=True, text=True, check=True).stdout.split()
    grew = int(out[0])
    assert out[1].startswith("cuda")
    assert grew < 2 * shard + 64 * 2**20 < total, (
        f"host peak grew {grew / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model")
