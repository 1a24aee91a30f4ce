"""The training loop: accumulate, clip, step, schedule, evaluate, log, checkpoint.

Nothing here knows how the model is sharded; FSDP-specific calls come from `parallel`, disk layout from
`checkpoint`. Losses are normalised by the global token (or sample) count of the whole step, so N ranks
train exactly like one process with the same global batch. Host syncs happen only at log, eval and save.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fsdp_ft.checkpoint import dcp_checkpoint
from fsdp_ft.config import Config
from fsdp_ft.data.splits import BatchPlan, eval_batches
from fsdp_ft.model import adapters
from fsdp_ft.observability.flops import FlopCounts, batch_flops, mfu
from fsdp_ft.observability.metrics import MetricsLogger, peak_host_rss_bytes, peak_memory_bytes
from fsdp_ft.observability.profiling import StepProfiler
from fsdp_ft.parallel import fsdp
from fsdp_ft.runtime import preemption
from fsdp_ft.runtime.distributed import DistEnv, all_gather_object, all_reduce_sum
from fsdp_ft.training import best, step_batches
from fsdp_ft.training.step_batches import StepBatches


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's state.json."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    last_eval_step: int = -1
    extra: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # train.best_metric: metric, mode, step, value (see best.py)
    run: dict = field(default_factory=dict)  # run id and fingerprint (see run_identity.py)
    quantized_base: str | None = None  # QLoRA: the digest of the base as stored (quantize.base_layout)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, model, task, optimizer, scheduler, scaler,
                 train_rows, eval_rows, logger: MetricsLogger, state: TrainState, plan: BatchPlan,
                 total_steps: int, flop_counts: FlopCounts | None = None, peak_flops: float = 0.0):
        self.cfg, self.env, self.model, self.task = cfg, env, model, task
        self.flop_counts, self.peak_flops = flop_counts, peak_flops  # for MFU (see flops.py)
        self.mem_tracker = None  # a memtrack.TensorMemory when train.track_memory is on
        self.profiler = StepProfiler(cfg.train.profile_steps, cfg.output_dir, env.rank, env.device)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.train_rows, self.eval_rows, self.logger, self.state = train_rows, eval_rows, logger, state
        self.total_steps = total_steps
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.plan = plan
        self._perm_epoch, self._perm = -1, None
        self.saved_step = None  # the step whose checkpoint this process wrote or resumed from
        self.trial = None  # a trial_link.TrialLink when this run is a trial of a search
        self.pruned_at = None  # the step at which the search pruned this trial
        self.batches = StepBatches(self._host_step_batches, env.device,
                                   step_batches.enabled(cfg.train.prefetch_batches, env.device))

    # ------------------------------------------------------------ batches

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def _collate(self, rows, indices: list[int]) -> dict:
        return self._to_device(self.task.collate([self.task.encode(rows[i]) for i in indices]))

    def _host_step_batches(self, position: tuple[int, int]) -> list[dict]:
        """The micro-batches of the step at (epoch, step in epoch), on the host."""
        epoch, step_in_epoch = position
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = self.plan.permutation(epoch), epoch
        return [self.task.collate([self.task.encode(self.train_rows[i]) for i in idx])
                for idx in self.plan.micro_batches(self._perm, step_in_epoch)]

    def _step_batches(self) -> list[dict]:
        """This step's batches on the device; the next step's are started (train.prefetch_batches)."""
        s = self.state
        following = None
        if s.step + 1 < self.total_steps:
            following = (s.epoch, s.step_in_epoch + 1)
            if following[1] >= self.plan.steps_per_epoch:
                following = (s.epoch + 1, 0)
        return self.batches.get((s.epoch, s.step_in_epoch), following)

    # ------------------------------------------------------------ one optimizer step

    def train_step(self) -> dict[str, torch.Tensor]:
        """Forward/backward every micro-batch of the step, then clip and step. Returns tensors (no sync)."""
        batches = self._step_batches()
        count = all_reduce_sum(sum(self.task.count(b) for b in batches).to(self.env.device).float())
        loss_sum = torch.zeros((), device=self.env.device)
        tokens = torch.zeros((), device=self.env.device, dtype=torch.long)
        flops = torch.zeros((), device=self.env.device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            sums = self.micro_step(batch, count, last=i == len(batches) - 1)
            loss_sum += sums["loss"].detach()
            tokens += batch["attention_mask"].sum()
            if self.flop_counts is not None:
                flops += batch_flops(self.flop_counts, batch)
        grad_norm, lr = self.optimizer_step()
        self.scheduler.step()
        return {"loss_sum": loss_sum, "count": count, "tokens": tokens, "grad_norm": grad_norm, "lr": lr,
                "flops": flops}

    def micro_step(self, batch: dict, count: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; gradients are reduced over ranks after the last one only.
        (deepspeed_engine.py overrides this and optimizer_step: the rest of the loop is shared.)"""
        fsdp.start_micro_step(self.model, self.cfg, last)
        sums = self.task.loss_sums(self.model, batch)
        # FSDP averages gradients over ranks; scaling by world size turns that average into the global sum
        loss = sums["loss"] * self.env.world_size / count
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return sums

    def optimizer_step(self) -> tuple[torch.Tensor, float]:
        """Clip and step; returns the gradient norm before clipping and the lr this step used."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = fsdp.clip_grad_norm(self.trainable, self.cfg.optim.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on after)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Task metrics over the whole eval set, summed over ranks (every rank runs the same number of batches)."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        size = self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size
        self.batches.wait()  # the task is not shared with the batch worker while it builds
        for idx in eval_batches(len(self.eval_rows), size, self.env.world_size, self.env.rank):
            weight = 1.0 if idx else 0.0  # a rank with no rows left still runs the forward FSDP needs
            batch = self._collate(self.eval_rows, idx or [0])
            for k, v in getattr(self.task, "eval_sums", self.task.loss_sums)(self.model, batch).items():
                sums[k] = sums.get(k, 0) + v.detach().double().to(self.env.device) * weight
        self.model.train()
        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist()
        self.state.last_eval_step = self.state.step
        return self.task.metrics(dict(zip(keys, totals)))

    # ------------------------------------------------------------ the loop

    def _advance_position(self) -> bool:
        """Move the data position one step; True when an epoch just ended."""
        self.state.step += 1
        self.state.step_in_epoch += 1
        if self.state.step_in_epoch >= self.plan.steps_per_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            return True
        return False

    def _log_train(self, window: dict, started: float, first_row: bool) -> None:
        loss_sum = all_reduce_sum(window["loss_sum"].double())
        tokens = int(all_reduce_sum(window["tokens"].clone()).item())
        self.state.tokens_seen += tokens
        elapsed = max(time.perf_counter() - started, 1e-9)
        peaks = all_gather_object(peak_memory_bytes(self.env.device))
        row = {"step": self.state.step, "epoch": self.state.epoch, "loss": (loss_sum / window["count"]).item(),
               "lr": window["lr"], "grad_norm": window["grad_norm"].item(),
               "tokens": self.state.tokens_seen, "tokens_per_s": tokens / elapsed,
               "peak_mem_bytes": max(peaks), "peak_mem_bytes_per_rank": peaks,
               "peak_host_rss_bytes": peak_host_rss_bytes()}
        if self.scaler:
            row["loss_scale"] = float(self.scaler.get_scale())
        if self.cfg.train.compile:
            row["compiled_graphs"] = fsdp.compiled_graphs()
        if first_row:
            row["state_bytes_per_rank"] = all_gather_object(self.state_bytes())
        if self.flop_counts is not None and torch.is_tensor(window.get("flops")):
            flops_per_s = all_reduce_sum(window["flops"].clone()).item() / elapsed  # model FLOPs of all ranks
            row.update(flops_per_s=flops_per_s, mfu=mfu(flops_per_s, self.peak_flops, self.env.world_size))
        if self.mem_tracker is not None:
            tensor_peaks = all_gather_object(self.mem_tracker.peak_bytes())
            row.update(peak_tensor_bytes=max(tensor_peaks), peak_tensor_bytes_per_rank=tensor_peaks,
                       peak_tensor_bytes_by_kind=self.mem_tracker.peak_by_kind())  # rank 0's
        self.logger.log(row)

    def state_bytes(self) -> int:
        """Bytes this rank holds for parameters, gradients and optimizer state (another engine counts its own)."""
        return fsdp.sharded_state_bytes(self.model, self.optimizer)

    def _log_eval(self) -> bool:
        """Evaluate and log; True when train.best_metric is on (this step's checkpoint must then be saved)."""
        if self.eval_rows is None:
            return False
        metrics = self.evaluate()
        row = {"split": "eval", "step": self.state.step, "epoch": self.state.epoch, **metrics}
        if best.enabled(self.cfg):
            self.state.best = best.start(self.cfg, self.state.best)
            row["is_best"] = best.update(self.state.best, metrics, self.state.step)
            row.update(best_step=self.state.best["step"], best_value=self.state.best["value"])
        self.logger.log(row)
        last = self.state.step >= self.total_steps  # reported, never pruned: the trial is complete
        if self.trial is not None and self.trial.should_prune(self.state.step, metrics, last):
            self.pruned_at = self.state.step
        return best.enabled(self.cfg)

    def save(self) -> None:
        """Checkpoint this step, unless this process already holds it on disk (a stop signal on a save step, or a
        run resumed at its end)."""
        if self.state.step == self.saved_step:
            return
        state = {k: v for k, v in vars(self.state).items()}
        state["scheduler"] = self.scheduler.state_dict()
        self.write_checkpoint(state)
        self.saved_step = self.state.step

    def write_checkpoint(self, state: dict) -> None:
        state["scaler"] = self.scaler.state_dict() if self.scaler else None
        dcp_checkpoint.save_checkpoint(self.cfg.output_dir, self.state.step, self.model, self.optimizer, state,
                                   self.env, self.cfg.train.keep_last, trainable_only=adapters.is_peft(self.cfg))

    def fit(self) -> TrainState:
        try:
            return self._loop()
        finally:
            self.batches.close()
            self.profiler.close()

    def _loop(self) -> TrainState:
        t = self.cfg.train
        self.model.train()
        window, started, first = None, time.perf_counter(), True
        while self.state.step < self.total_steps:
            self.profiler.before_step(self.state.step + 1)
            out = self.train_step()
            self.profiler.after_step(self.state.step + 1)
            if window is None:
                window = out
            else:
                window = {"loss_sum": window["loss_sum"] + out["loss_sum"], "count": window["count"] + out["count"],
                          "tokens": window["tokens"] + out["tokens"], "grad_norm": out["grad_norm"], "lr": out["lr"],
                          **({"flops": window["flops"] + out["flops"]} if "flops" in out else {})}
            epoch_end = self._advance_position()
            done = self.state.step >= self.total_steps
            if self.state.step % t.log_every == 0 or done:
                self._log_train(window, started, first)
                window, started, first = None, time.perf_counter(), False
            save_for_best = False  # with train.best_metric every evaluated step is saved: it may be the best
            if (t.eval_every and self.state.step % t.eval_every == 0) or (not t.eval_every and epoch_end) or done:
                if self.state.last_eval_step != self.state.step:
                    save_for_best = self._log_eval()
            if (t.save_every and self.state.step % t.save_every == 0) or done or save_for_best:
                self.save()
            self.logger.advance()
            if self.pruned_at is not None:  # every rank got the same answer in this step's eval
                self.logger.log({"split": "pruned", "step": self.state.step})
                break
            if preemption.should_stop():  # a stop signal reached some rank: all save this same step and return
                if window is not None:
                    self._log_train(window, started, first)
                self.save()
                break
        return self.state
