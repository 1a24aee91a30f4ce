"""Preference tuning of a causal LM on chosen/rejected pairs: DPO (against a frozen reference), ORPO and SimPO
(none).

DPO (Rafailov et al. 2023): with the log-ratio r = log pi(y|x) - log pi_ref(y|x) summed over the response tokens
and the margin h = r_chosen - r_rejected, preference.loss_type picks the loss:
- sigmoid: -log sigmoid(beta h); with preference.label_smoothing = e the conservative variant
  -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h);
- ipo (Azar et al. 2023): (h - 1/(2 beta))^2, with r averaged over the response's tokens (as TRL computes it);
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
The implicit rewards beta * r (r summed, for every loss type, as TRL logs them) are the eval's chosen/rejected
rewards. The reference is the model training started from: for PEFT runs the same model with
its adapters disabled (no second copy); for full and partial fine-tuning a frozen, sharded copy that
engine.build makes (`self.reference`). Either way it is rebuilt from model.path on resume, never from a
checkpoint, so it cannot drift.

ORPO (Hong et al. 2024): loss = NLL(chosen) + lambda * -log sigmoid(log odds(chosen) - log odds(rejected)),
where NLL and the odds use the length-averaged token log-probability p of each response, odds = p / (1 - p).
Rewards reported are lambda * that average log-probability (as TRL logs them).

SimPO (Meng et al. 2024): the reward of a response is beta * its mean token log-probability (no reference), and
loss = -log sigmoid(reward_chosen - reward_rejected - gamma), gamma a target margin.

Losses are returned as sums over pairs with the pair count, so the trainer's global normalisation makes
N ranks equal one process.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.parallel import fsdp
from fsdp_ft.tasks.pairs import PAIR_METRICS, PairTask, pair_count, pair_metrics, sequence_logps


def lm_logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@contextlib.contextmanager
def starting_model(model):
    """The PEFT policy as it started: adapters off, and dropout off so the reference is deterministic.

    Adapter layers are switched off by their `_disable_adapters` flags only. peft's `disable_adapter()` also
    toggles requires_grad, which under FSDP2 lands on whichever parameter objects are registered at that moment
    (sharded or gathered): with reshard_after_forward=false the sharded adapters stayed frozen and checkpoints
    lost them. Prompt learning has no such layers; peft disables it by swapping the forward, which is safe.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    was_training = model.training
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    flags = [m._disable_adapters for m in layers]
    try:
        if layers:
            for m in layers:
                m._disable_adapters = True
            yield model
        else:
            with model.disable_adapter():
                yield model
    finally:
        for m, flag in zip(layers, flags):
            m._disable_adapters = flag
        model.train(was_training)


class DPOTask(PairTask):
    """Eval `accuracy`: the policy gives the chosen response a higher log-probability than the rejected one (at
    step 0 that is the starting model's own preference, so a rise is visible); `reward_accuracy`: the implicit
    reward of the chosen response is higher (TRL's rewards/accuracies; 0 at step 0, where all rewards tie)."""
    name = "dpo"
    needs_reference = True
    eval_metrics = PAIR_METRICS + ("reward_accuracy",)

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.reference = None  # a frozen copy for full/partial fine-tuning (engine.build); None: adapters off

    @torch.no_grad()
    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        if self.reference is not None:
            logits = lm_logits(self.reference, batch)
            fsdp.reshard_all(self.reference)  # a forward-only model: free what its forward gathered
        else:
            if not hasattr(model, "disable_adapter"):
                raise ConfigError("task 'dpo' needs its reference model: a PEFT model's is itself with adapters "
                                  "disabled; a full or partial fine-tune's is the starting model (model.path), "
                                  "which `fsdp-ft train` builds")
            with starting_model(model):
                logits = lm_logits(model, batch)
        return sequence_logps(logits, batch["labels"])[0]

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        ref = self.reference_logps(model, batch)  # first: nothing may run between the policy's forward and backward
        logps, lengths = sequence_logps(lm_logits(model, batch), batch["labels"])
        n = logps.shape[0] // 2
        p = self.cfg.preference
        ratio = logps - ref
        chosen_ratio, rejected_ratio = ratio[:n], ratio[n:]
        margin = chosen_ratio - rejected_ratio
        if p.loss_type == "ipo":
            mean_ratio = ratio / lengths.clamp(min=1)
            losses = (mean_ratio[:n] - mean_ratio[n:] - 1 / (2 * p.beta)) ** 2
        elif p.loss_type == "hinge":
            losses = F.relu(1 - p.beta * margin)
        else:
            z = p.beta * margin
            losses = -(1 - p.label_smoothing) * F.logsigmoid(z) - p.label_smoothing * F.logsigmoid(-z)
        chosen_reward, rejected_reward = p.beta * chosen_ratio.detach(), p.beta * rejected_ratio.detach()
        return {"loss": losses.sum(), "count": pair_count(batch), "chosen_reward": chosen_reward.sum(),
                "rejected_reward": rejected_reward.sum(), "correct": (logps[:n] > logps[n:]).detach().sum(),
                "reward_correct": (chosen_reward > rejected_reward).sum()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**pair_metrics(sums), "reward_accuracy": sums["reward_correct"] / max(sums["count"], 1)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it (Maechler's two branches)."""
    x = x.clamp(max=-1e-6)  # a response the model predicts with certainty has odds of infinity
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPOTask(PairTask):
    name = "orpo"
    eval_metrics = PAIR_METRICS + ("nll", "log_odds_ratio")

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logps, lengths = sequence_logps(lm_logits(model, batch), batch["labels"])
        mean_logp = logps / lengths.clamp(min=1)
        n = mean_logp.shape[0] // 2
        chosen, rejected = mean_logp[:n], mean_logp[n:]
        nll = -chosen
        log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
        lam = self.cfg.preference.orpo_lambda
        losses = nll - lam * F.logsigmoid(log_odds)
        return {"loss": losses.sum(), "count": pair_count(batch), "nll": nll.detach().sum(),
                "log_odds_ratio": log_odds.detach().sum(), "chosen_reward": lam * chosen.detach().sum(),
                "rejected_reward": lam * rejected.detach().sum(), "correct": (log_odds.detach() > 0).sum()}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1)
        return {**pair_metrics(sums), "nll": sums["nll"] / n, "log_odds_ratio": sums["log_odds_ratio"] / n}


class SimPOTask(PairTask):
    """Eval `accuracy`: the chosen response's reward (its mean token log-probability) beats the rejected one's."""
    name = "simpo"

    def loss_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logps, lengths = sequence_logps(lm_logits(model, batch), batch["labels"])
        rewards = self.cfg.preference.simpo_beta * logps / lengths.clamp(min=1)
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        losses = -F.logsigmoid(chosen - rejected - self.cfg.preference.simpo_gamma)
        return {"loss": losses.sum(), "count": pair_count(batch), "chosen_reward": chosen.detach().sum(),
                "rejected_reward": rejected.detach().sum(), "correct": (chosen > rejected).detach().sum()}
