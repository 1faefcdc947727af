"""One training step: forward, loss, backward, the skip decision, the update, the EMA.

``TrainStep(x, step)`` returns the batch's metrics as device tensors and reads
nothing back from the device except the skip decision (one host sync per
step, marked below).  Logging converts the metrics to numbers, and only on
logging steps (``hvae.logger``).  ``hvae.graphed_step.SyncFreeStep`` decides on
the device instead, so that the step can be captured in a CUDA graph.

Gradient accumulation: ``x`` may be a list of micro-batches, all forwarded and
back-propagated before the one update, with gradients weighted as for one batch
of their concatenation.  Under DDP only the last micro-batch all-reduces
(``no_sync`` on the others).  BatchNorm statistics and KL-balancing coefficients
stay per micro-batch; the spectral + BN regulariser is added once per update.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from hvae import objectives
from hvae.config import Config
from hvae.runtime import Runtime, autocast
from hvae.schedules import Schedule


class EMA:
    """Exponential moving average of the weights (buffers are copied), used for evaluation.

    The decay ramps up as min(decay, (1 + step) / (10 + step)) so that early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = (list(self.model.parameters()), [p.detach() for p in model.parameters()],
                       list(self.model.buffers()), list(model.buffers()))

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int | None = None, weight: torch.Tensor | None = None) -> None:
        """Move the average towards the weights by ``1 - decay_at(step)``, or by ``weight``
        (a device tensor: the sync-free step passes 0 for a skipped update)."""
        ema_params, params, ema_buffers, buffers = self._pairs
        if weight is None:
            torch._foreach_lerp_(ema_params, params, 1 - self.decay_at(step))
        else:  # foreach lerp would read a tensor weight on the host
            moved = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(moved, weight)
            torch._foreach_add_(ema_params, moved)
        torch._foreach_copy_(ema_buffers, buffers)


def lower_median(values: torch.Tensor) -> torch.Tensor:
    """The lower median of the finite entries of a 1-d tensor (its smallest entry, +inf
    or NaN, if there are none), computed on the device: a sort (+inf, then NaN, sort
    last) and one gather, nothing a CUDA-graph capture forbids.  Equal to
    ``torch.nanmedian`` for finite values padded with NaN."""
    ordered = values.sort().values
    middle = (values.isfinite().sum() - 1).clamp_min(0) // 2
    return ordered.gather(0, middle.view(1)).squeeze(0)


class GradSkipper:
    """Decides, on the device, which updates to drop: non-finite losses or gradient
    norms always, outliers sometimes.

    An update is an outlier when its norm exceeds ``factor`` times the median
    (the lower median for an even count) of the last ``history`` accepted
    norms, once ``warmup`` of them exist.  The threshold cannot stall
    training: after ``patience`` consecutive outliers the next one is
    accepted, so the history follows a real change of scale.  State lives in
    device tensors, so deciding needs no sync: a ring of the last accepted norms, its
    empty slots +inf (never a recorded norm: a non-finite norm is always skipped).  Not
    NaN: a saved history then equals itself (NaN != NaN), so a resumed run's history
    can be checked against an uninterrupted one's with ``torch.equal``.
    """

    def __init__(self, factor: float, enabled: bool = True, history: int = 100,
                 warmup: int = 20, patience: int = 5, device: torch.device | str = "cpu"):
        self.factor, self.enabled, self.warmup, self.patience = factor, enabled, warmup, patience
        self.norms = torch.full((history,), math.inf, device=device)
        self._positions = torch.arange(history, device=device)
        self.accepted = torch.zeros((), dtype=torch.long, device=device)   # norms written so far
        self.consecutive = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def decide(self, norm: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor: skip this update?"""
        bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
        if not self.enabled:
            return bad
        outlier = ((norm > self.factor * lower_median(self.norms))
                   & (self.accepted >= self.warmup) & (self.consecutive < self.patience))
        return bad | outlier

    def record(self, norm: torch.Tensor, skip: torch.Tensor) -> None:
        """Update the history with the decision all ranks agreed on."""
        slot = self._positions == self.accepted % self.norms.numel()  # one-hot: no host index
        self.norms.copy_(torch.where(slot & ~skip, norm.float(), self.norms))
        self.accepted += (~skip).long()
        self.consecutive.copy_(torch.where(skip, self.consecutive + 1, 0))  # in place: CUDA graphs
        self.skipped += skip.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"norms": self.norms.cpu(), "accepted": self.accepted.cpu(),
                "consecutive": self.consecutive.cpu(), "skipped": self.skipped.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("norms", "accepted", "consecutive", "skipped"):
            getattr(self, name).copy_(state[name])
        self.norms.nan_to_num_(nan=math.inf, posinf=math.inf)  # older checkpoints: NaN-padded


@dataclasses.dataclass(frozen=True)
class StepValues:
    """The schedules' numbers for one step.  Plain floats in ``TrainStep``; in the
    sync-free step (``hvae.graphed_step``) the numbers are device tensors, refilled
    every step, and only the two flags (which change the step's structure) are
    Python values."""
    lr: float | torch.Tensor
    kl_weight: float | torch.Tensor
    reg_lambda: float | torch.Tensor
    balancing: bool          # KL balancing on (during the KL warm-up)
    regularise: bool         # reg_lambda != 0: the spectral + BN regulariser is computed

    @classmethod
    def at(cls, schedule: Schedule, step: int) -> "StepValues":
        lam = schedule.reg_lambda(step)
        return cls(lr=schedule.learning_rate(step), kl_weight=schedule.kl_weight(step),
                   reg_lambda=lam, balancing=schedule.balancing(step), regularise=lam != 0)


def _combine(parts: list[tuple[objectives.Loss, dict]], weights: list[float]
             ) -> tuple[objectives.Loss, dict]:
    """One step's loss and terms from its micro-batches' (per-image terms concatenated,
    summaries averaged by images; the regulariser, computed on the last micro-batch
    only, counted once)."""
    losses = [p[0] for p in parts]
    reg = losses[-1].reg
    loss = objectives.Loss(
        loss=sum(w * (l.loss.detach() - l.reg) for w, l in zip(weights, losses)) + reg, reg=reg,
        per_image={k: torch.cat([l.per_image[k] for l in losses]) for k in losses[-1].per_image},
        summary={k: sum(w * l.summary[k] for w, l in zip(weights, losses))
                 for k in losses[-1].summary})
    return loss, parts[-1][1]


def batchnorm_state(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm buffer a forward pass in training mode changes."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def step_counts_on_host(optimizer: torch.optim.Optimizer) -> None:
    """Keep each parameter's step count on the CPU, where torch's non-capturable
    optimisers expect it.  A checkpoint loaded onto a GPU puts them there, and the
    optimiser would then read every one back: one host sync per parameter per step."""
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")) and state["step"].device.type != "cpu":
                state["step"] = state["step"].to("cpu", torch.float32)


@dataclasses.dataclass
class StepParts:
    """What a training step reads and updates (``hvae.training.build_step_parts`` makes
    them): the plain model and what runs its forward (itself, or its DDP wrapper), the
    schedules, the optimiser, the spectral regulariser, the EMA (or None), the skip
    history and the loss scaler."""
    model: nn.Module
    net: nn.Module
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    spectral: objectives.SpectralRegularizer
    ema: EMA | None
    skipper: GradSkipper
    scaler: torch.amp.GradScaler


class TrainStep:
    """Forward, loss, backward and (unless skipped) one optimiser update of one batch.

    ``model`` is the plain model, ``net`` what runs the forward (the model, or
    its DDP wrapper).  A skipped update leaves no trace: gradients are dropped,
    and what its forward pass changed (BatchNorm statistics and batch counts,
    the spectral regulariser's power-iteration vectors) is restored.
    """

    def __init__(self, parts: StepParts, config: Config, runtime: Runtime):
        self.parts, self.config, self.runtime = parts, config, runtime
        self.model, self.net = parts.model, parts.net
        self.optimizer, self.spectral, self.ema = parts.optimizer, parts.spectral, parts.ema
        self.skipper, self.scaler = parts.skipper, parts.scaler
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.balance_weights = objectives.group_prior_weights(self.model.group_scale).to(runtime.device)
        self._forward_state = batchnorm_state(self.model) + list(self.spectral.buffers())
        self._forward_backup = [b.clone() for b in self._forward_state]
        self.autocast_cache = True  # autocast's cast cache (off under CUDA-graph capture)
        self.optimizer.register_load_state_dict_post_hook(step_counts_on_host)

    @property
    def schedule(self) -> Schedule:
        """The parts' schedule (read every step: a heal replaces it with a lower learning rate)."""
        return self.parts.schedule

    def __call__(self, x: torch.Tensor | Sequence[torch.Tensor], step: int,
                 stop_requested: bool | Callable[[], bool] = False) -> dict:
        """Metrics of the step as device tensors, plus ``skipped`` and ``stop`` (whether
        every rank agreed to stop after this step: a signal reached one of them).

        ``x``: one batch, or a list of micro-batches (gradient accumulation).
        ``stop_requested`` may be a callable, read just before the update, so that
        a signal arriving between micro-batches stops after this step."""
        values = StepValues.at(self.schedule, step)
        for group in self.optimizer.param_groups:
            group["lr"] = values.lr
        loss, reg = self.forward_backward_all(x, values)
        if callable(stop_requested):
            stop_requested = stop_requested()
        norm, skipped, stop = self.update(loss, step, stop_requested)
        return {**self.metrics(loss, reg, values, norm), "skipped": skipped,
                "skipped_total": self.skipper.skipped, "stop": stop}

    def forward_backward_all(self, x: torch.Tensor | Sequence[torch.Tensor], values: StepValues
                             ) -> tuple[objectives.Loss, dict]:
        """Forward and backward of every micro-batch of the step; their combined loss."""
        micro = list(x) if isinstance(x, (list, tuple)) else [x]
        total = sum(m.shape[0] for m in micro)
        parts = []
        for k, xb in enumerate(micro):
            last = k == len(micro) - 1
            no_sync = getattr(self.net, "no_sync", None)  # DDP: all-reduce on the last only
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                parts.append(self.forward_backward(xb, values, weight=xb.shape[0] / total,
                                                   first=k == 0, last=last))
        return parts[0] if len(parts) == 1 else _combine(parts, [m.shape[0] / total for m in micro])

    def metrics(self, loss: objectives.Loss, reg: dict, values: StepValues, norm: torch.Tensor
                ) -> dict:
        return {"loss": loss.loss.detach(),
                **{name: term.mean() for name, term in loss.per_image.items()}, **loss.summary,
                "bpd": objectives.bits_per_dim(loss.nelbo.mean(), self.model.data_dims),
                "kl": loss.kl_groups.sum(), "kl_weight": values.kl_weight,
                "reg": loss.reg, **reg, "lr": values.lr, "grad_norm": norm}

    def forward_backward(self, x: torch.Tensor, step: int | StepValues, weight: float = 1.0,
                         first: bool = True, last: bool = True) -> tuple[objectives.Loss, dict]:
        """The regularised loss of one batch, back-propagated (gradients averaged over ranks).

        ``step``: the step number, or its ``StepValues``.  For micro-batch
        accumulation: the data loss's gradient is scaled by ``weight`` (its share
        of the step's images); ``first`` clears the gradients and backs up the
        forward-mutated state, ``last`` adds the regulariser (a function of the
        weights only: once per update)."""
        cfg = self.config
        values = step if isinstance(step, StepValues) else StepValues.at(self.schedule, step)
        x = self.on_device(x)
        if first:
            torch._foreach_copy_(self._forward_backup, self._forward_state)
        self.model.train()
        reg, terms = None, {"reg_lambda": values.reg_lambda}
        with self.model.stacked_weights():  # weights stacked once for forward and regularisers
            with autocast(self.runtime.device, cfg.amp, cache_enabled=self.autocast_cache):
                output = self.net(x, analytic_kl=not cfg.kl_mc)
            if last and values.regularise:
                terms.update(reg_spectral=self.spectral(),
                             reg_bn=objectives.bn_regularizer(self.model))
                reg = values.reg_lambda * (terms["reg_spectral"] + terms["reg_bn"])
        recon, kl = -output.likelihood.log_prob(x), output.kl_groups
        del output  # the latents it holds are not needed for backward: freed before it
        whole = weight == 1.0
        loss = objectives.compute_loss(
            recon, kl, kl_weight=values.kl_weight,
            balance_weights=self.balance_weights if values.balancing else None,
            free_bits=cfg.kl_free_bits, reg=reg if whole else None)
        total = loss.loss
        if not whole:  # a micro-batch: its share of the data loss, the regulariser in full
            total = weight * total
            if reg is not None:
                total = total + reg
                loss = dataclasses.replace(loss, loss=loss.loss.detach() + reg.detach(),
                                           reg=reg.detach())
        if first:
            self.clear_gradients()
        self.scaler.scale(total).backward()
        return loss, {k: v.detach() if torch.is_tensor(v) else v for k, v in terms.items()}

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the run's device, in the model's memory layout."""
        x = x.to(self.runtime.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def release_graph(self) -> None:
        """Nothing to give back before evaluation: an eager step holds no captured graph
        (``SyncFreeStep`` does)."""

    def clip_gradients(self) -> torch.Tensor:
        """Clip the (unscaled) gradients to ``grad_clip``; their norm before clipping."""
        if self.config.grad_clip > 0:
            return nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        return nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def clip_and_decide(self, loss: objectives.Loss) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale and clip the gradients: (their norm, skip this update?), device tensors."""
        self.scaler.unscale_(self.optimizer)
        norm = self.clip_gradients()
        return norm, self.skipper.decide(norm, loss.loss.detach())

    def update(self, loss: objectives.Loss, step: int, stop_requested: bool = False
               ) -> tuple[torch.Tensor, bool, bool]:
        """Clip, decide, then apply the gradients unless the update is skipped:
        (gradient norm as a device tensor, skipped, stop agreed by every rank)."""
        norm, skip = self.clip_and_decide(loss)
        if self.runtime.distributed:  # every rank takes the same decisions
            flags = torch.stack([skip, torch.tensor(stop_requested, device=skip.device)]).int()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            skip = flags[0] > 0
            skipped, stop = (flags > 0).tolist()  # HOST SYNC: the step's only one
        else:
            skipped, stop = bool(skip), stop_requested  # HOST SYNC: the step's only one
        self.skipper.record(norm, skip)
        if skipped:
            torch._foreach_copy_(self._forward_state, self._forward_backup)
            self.spectral.forget_host_flag()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() / 2)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(step)
        return norm.detach(), skipped, stop

    def weights_are_finite(self) -> bool:
        """Whether every weight is finite (a host sync: call on logging or checkpoint steps)."""
        norms = torch._foreach_norm([p.detach() for p in self.params])
        return bool(torch.stack(norms).isfinite().all())
