"""Reward modelling: a sequence classifier with one output scores prompt + response; trained with the pairwise
(Bradley-Terry) loss -log sigmoid(r_chosen - r_rejected). Eval: pair accuracy (r_chosen > r_rejected), the mean
scores and their margin. The model is a plain `AutoModelForSequenceClassification` with num_labels = 1, so the
export is a normal HF classifier folder."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsdp_ft.tasks.pairs import PairTask, pair_count

REWARD_LABEL = "reward"


class RewardTask(PairTask):
    name = "reward"

    def labels(self, table) -> list[str]:
        """One output: the scalar score."""
        return [REWARD_LABEL]

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, 0]
        n = scores.shape[0] // 2
        chosen, rejected = scores[:n].detach(), scores[n:].detach()
        return {"loss": -F.logsigmoid(scores[:n] - scores[n:]).sum(), "count": pair_count(batch),
                "chosen_reward": chosen.sum(), "rejected_reward": rejected.sum(), "correct": (chosen > rejected).sum()}
