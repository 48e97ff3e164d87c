"""The reward-model objective on one packed micro-batch, as a module (so that FSDP2's root hooks
gather the embeddings, final norm, reward head and LM head around it):

    loss = BT(r_c, r_r; mask, margin) + mu * magnitude(r_c, r_r) + lambda * LM(chosen response tokens)

each term divided by its global-batch normaliser, so the micro-batch losses of one optimizer step
add up to the whole global batch's loss whatever the packing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from themis_engine import kernels
from themis_engine.model.decoder import RewardModel
from themis_engine.packing.batch import SegmentMeta


class RewardObjective(nn.Module):
    def __init__(self, rm: RewardModel, lm_coef: float = 0.0, magnitude_coef: float = 0.0,
                 magnitude: str = "centering"):
        super().__init__()
        if lm_coef > 0 and rm.lm_head is None:
            raise ValueError("lm_coef > 0 needs the LM head: load the model with keep_lm_head=True")
        self.rm = rm
        self.lm_coef = float(lm_coef)
        self.magnitude_coef = float(magnitude_coef)
        self.magnitude = magnitude

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        meta: SegmentMeta,
        chosen_rows: torch.Tensor,
        rejected_rows: torch.Tensor,
        mask: torch.Tensor,
        margin: torch.Tensor,
        lm_rows: torch.Tensor,
        lm_labels: torch.Tensor,
        bt_normalizer: float,
        lm_normalizer: float,
        score_index: torch.Tensor | None = None,
    ):
        """Returns (loss, BTOutput, lm_loss or None). Rows index the packed stream; mask/margin [n, H]."""
        del score_index  # the objective reads chosen_rows / rejected_rows instead
        h = self.rm.hidden_states(input_ids, position_ids, meta)  # [T, D]
        n = chosen_rows.shape[0]
        scored = self.rm.model.norm(h[torch.cat([chosen_rows, rejected_rows])])  # [2n, D]
        bt = kernels.bt_loss(scored[:n], scored[n:], self.rm.score.weight, mask, margin,
                             self.magnitude_coef, self.magnitude, bt_normalizer)
        loss = bt.loss
        lm = None
        if self.lm_coef > 0 and lm_rows.numel() > 0:
            hl = self.rm.model.norm(h[lm_rows])
            lm = kernels.linear_cross_entropy(hl, self.rm.lm_head.weight, lm_labels, -100, lm_normalizer)
            loss = loss + self.lm_coef * lm
        return loss, bt, lm
