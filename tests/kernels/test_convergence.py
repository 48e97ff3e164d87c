"""Convergence: a tiny reward model trained a few steps with the Triton kernels and with the PyTorch
references takes the same path.

Set-up. A 2-layer Qwen3-family RewardModel (hidden 32, 4 query / 2 kv heads of dim 16, 3 criteria,
an untied LM head), randomly initialised in float32 from a fixed seed, is trained for STEPS AdamW
steps on one packed prefix-shared micro-batch of preference pairs (themis_engine.packing:
flatten_groups -> plan -> PackedBatch.to_torch). The loss is the trainer's recipe:

    kernels.bt_loss(norm(h[chosen]), norm(h[rejected]), score.weight, mask, mu=MU)     (BT + centering)
  + LM_COEF * kernels.linear_cross_entropy(norm(h[chosen response rows]), lm_head.weight, next tokens)

so every op of `themis_engine.kernels` is on the path (attention, qk_norm_rope, rms_norm with and
without the fused residual, swiglu, bt_loss, linear_cross_entropy), forward and backward. The run is
done twice from the same initial weights: THEMIS_KERNELS=triton (the Triton interpreter on a machine
with no GPU, the compiled kernels on a GPU) and THEMIS_KERNELS=reference. `kernels.backend_for`
reads the variable at each call, so one monkeypatched env var switches every op.

Tolerance (float32 throughout). Per step, the losses must agree within rtol=RTOL_LOSS (1e-5) and
the final parameters within rtol=RTOL_PARAM, atol=ATOL_PARAM (1e-4 relative, 1e-5 absolute), i.e.
about 1/10 of one AdamW step at LR = 1e-3 for parameters near zero. Why this size:

* the two backends compute the same math in a different order (online softmax in tiles vs
  materialised scores, chunked / fused reductions), so each op differs by a few float32 ulps
  (~1e-7 relative); through two layers and their backward the loss and gradients differ by
  ~1e-6 relative at most;
* AdamW turns a gradient g into ~LR * g / (sqrt(v) + eps): an update differs by about LR times the
  RELATIVE difference of its gradient element, which is ~1e-6 for typical elements but larger for
  elements whose gradient is nearly zero (their few absolute ulps of difference are a large
  fraction). Measured here, interpreter vs references on CPU: 3e-7 absolute on the parameters
  (= LR * 3e-4 over STEPS steps), 1.2e-7 on the losses, the same with ADAM_EPS = 1e-8 (torch's
  default, used) as with 1e-6. The tolerance leaves a ~30-80x margin for other CPUs / BLAS builds
  and the GPU. (Should it ever flake, it would be an element with a ~zero gradient whose Adam step
  sign is decided by rounding; a larger ADAM_EPS is the remedy, not a looser tolerance.)
* it is tight enough to catch a real kernel bug: scaling one op's input gradient by 1 + 1e-4
  (swiglu's dgate) or 1 + 1e-3 (attention's dk) fails it; 1 + 1e-5 on attention's dk does not
  (tried by hand). The test also checks that training moves the parameters by >> the tolerance,
  so agreement is not vacuous.

As a yardstick the same training is also run on the references in float64, and the kernel run must
be no further from the float32 reference run than MAX_VS_FP64 (10) times the float32 reference
run's own distance to float64 (plus a floor of 1e-6): the kernels add at most rounding of the same
order as float32 itself.
"""

from __future__ import annotations

import time

import pytest
import torch

from themis_engine import kernels
from themis_engine.model.args import ModelArgs
from themis_engine.model.decoder import RewardModel
from themis_engine.packing.planner import flatten_groups, plan

STEPS = 5
LR = 1e-3
ADAM_EPS = 1e-8
MU = 0.05
LM_COEF = 0.1
RTOL_LOSS = 1e-5
RTOL_PARAM, ATOL_PARAM = 1e-4, 1e-5
MAX_VS_FP64 = 10.0
OPS = ("attention", "rms_norm", "qk_norm_rope", "swiglu", "bt_loss", "linear_cross_entropy")


def _args() -> ModelArgs:
    return ModelArgs(
        family="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0, criteria=("a", "b", "c"),
    )


def _batch(vocab: int, device):
    """Four preference groups (prompt + chosen, prompt + rejected) packed into one prefix-shared
    micro-batch; lengths chosen to cross the interpreter's 16-row tiles. Returns the model inputs,
    the chosen / rejected score rows, the LM rows (chosen-response tokens that have a next token)
    and their labels."""
    g = torch.Generator().manual_seed(1234)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    shape = [(19, 7, 4), (5, 1, 12), (23, 17, 9), (2, 3, 3)]  # (prompt, chosen, rejected) lengths
    groups = []
    for p, c, r in shape:
        prompt = toks(p)
        chosen, rejected = toks(c), toks(r)
        rejected[0] = (chosen[0] + 1) % vocab or 3  # the responses differ at their first token
        groups.append([prompt + chosen, prompt + rejected])
    tokens, seq_off, grp_off = flatten_groups(groups)
    (batch,) = plan(tokens, seq_off, grp_off, budget=4096)
    inputs = batch.to_torch(device)
    assert int((batch.prefix_len > 0).sum()) == 2 * len(shape)  # every pair really shares its prompt

    seq_ids = batch.seq_ids.tolist()
    score = batch.score_index.tolist()
    row_of = dict(zip(seq_ids, score))
    n = len(groups)
    idx_c = torch.tensor([row_of[2 * i] for i in range(n)], device=device)
    idx_r = torch.tensor([row_of[2 * i + 1] for i in range(n)], device=device)

    # LM term: each chosen suffix segment predicts its own next tokens (rows a .. b-2 -> a+1 .. b-1);
    # every other such row is ignore_index, so the ignore path runs too
    cu = batch.cu_seqlens.tolist()
    ids = batch.input_ids
    lm_rows, labels = [], []
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        if batch.prefix_len[s] == 0 or (b - 1) not in idx_c.tolist():
            continue  # prefixes and rejected responses
        for t in range(a, b - 1):
            lm_rows.append(t)
            labels.append(int(ids[t + 1]) if (t - a) % 3 != 2 else -100)
    lm_rows = torch.tensor(lm_rows, device=device)
    labels = torch.tensor(labels, device=device)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool, device=device)
    return inputs, idx_c, idx_r, lm_rows, labels, mask


def _train(backend: str, dtype: torch.dtype, device, monkeypatch):
    """STEPS AdamW steps on the fixed batch; returns (losses [STEPS], final params {name: tensor}, init)."""
    monkeypatch.setenv("THEMIS_KERNELS", backend)
    args = _args()
    torch.manual_seed(0)
    model = RewardModel(args, with_lm_head=True)  # float32 init, so every run starts from the same values
    with torch.no_grad():  # make the norms' weights non-trivial (they init to ones)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape))
    model = model.to(device=device, dtype=dtype)
    model.inv_freq = model.inv_freq.to(device)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    for op in OPS:
        assert kernels.backend_for(op, model.score.weight) == backend, op

    inputs, idx_c, idx_r, lm_rows, labels, mask = _batch(args.vocab_size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.01)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        h = model.hidden_states(inputs["input_ids"], inputs["position_ids"], inputs["meta"])
        norm = model.model.norm
        bt = kernels.bt_loss(norm(h[idx_c]), norm(h[idx_r]), model.score.weight, mask, mu=MU)
        lm = kernels.linear_cross_entropy(norm(h[lm_rows]), model.lm_head.weight, labels)
        loss = bt.loss + LM_COEF * lm
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    params = {k: v.detach().to(torch.float64).cpu() for k, v in model.named_parameters()}
    return torch.tensor(losses, dtype=torch.float64), params, {k: v.to(torch.float64).cpu() for k, v in init.items()}


def _max_dist(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # ~15 s on 2 CPU cores (interpreter); kept out of the GPU check's quick test step
def test_kernels_and_references_train_alike(device, monkeypatch):
    t0 = time.perf_counter()
    loss_k, params_k, init = _train("triton", torch.float32, device, monkeypatch)
    loss_r, params_r, init_r = _train("reference", torch.float32, device, monkeypatch)
    loss_64, params_64, init_64 = _train("reference", torch.float64, device, monkeypatch)
    elapsed = time.perf_counter() - t0

    assert all(torch.equal(init[k], init_r[k]) for k in init)  # same starting point
    assert all(torch.equal(init[k], init_64[k]) for k in init)
    # training does something: the loss moves and every trained parameter tensor moves by >> tolerance
    assert abs(float(loss_r[-1] - loss_r[0])) > 100 * RTOL_LOSS * abs(float(loss_r[0]))
    moved = _max_dist(params_r, init)
    assert moved > 100 * ATOL_PARAM, moved

    torch.testing.assert_close(loss_k, loss_r, rtol=RTOL_LOSS, atol=0.0)
    for name in params_r:
        torch.testing.assert_close(params_k[name], params_r[name], rtol=RTOL_PARAM, atol=ATOL_PARAM,
                                   msg=lambda m, name=name: f"{name}: {m}")

    # yardstick: the kernel run's distance to the fp32 reference run is of the order of float32 rounding
    d_kernel = _max_dist(params_k, params_r)
    d_fp32 = _max_dist(params_r, params_64)
    assert d_kernel <= MAX_VS_FP64 * d_fp32 + 1e-6, (d_kernel, d_fp32)
    loss_d_kernel = float((loss_k - loss_r).abs().max())
    loss_d_fp32 = float((loss_r - loss_64).abs().max())
    assert loss_d_kernel <= MAX_VS_FP64 * loss_d_fp32 + 1e-6, (loss_d_kernel, loss_d_fp32)
    print(f"\nconvergence: {STEPS} steps, losses {[round(float(x), 6) for x in loss_k]}; "
          f"max |param| diff kernels vs ref {d_kernel:.2e} (fp32 ref vs fp64 ref {d_fp32:.2e}), "
          f"max |loss| diff {loss_d_kernel:.2e} (fp32 vs fp64 {loss_d_fp32:.2e}), "
          f"params moved {moved:.2e}; {elapsed:.1f}s")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q", "-s"])
