"""Every schedule of a run in one place: learning rate, KL warm-up, regulariser weight.

All are pure functions of the optimiser step (and of ``lr_scale``, which a heal
lowers: ``hvae.healing``), so a resumed run continues them exactly.  The KL windows are fractions of the run (``kl_const_portion``,
``kl_anneal_portion``); the learning-rate warm-up is ``warmup_epochs`` long.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hvae.config import Config


@dataclass(frozen=True)
class Schedule:
    config: Config
    total_steps: int
    lr_warmup_steps: int = 0
    lr_scale: float = 1.0   # the whole learning-rate curve's factor (each heal lowers it)

    @classmethod
    def for_run(cls, config: Config, steps_per_epoch: int) -> "Schedule":
        """The schedule of a run of ``config.epochs`` epochs, cut at ``max_steps``."""
        total = config.epochs * steps_per_epoch
        if config.max_steps:
            total = min(total, config.max_steps)
        return cls(config, total, int(config.warmup_epochs * steps_per_epoch))

    # ------------------------------------------------------- learning rate --
    def learning_rate(self, step: int) -> float:
        """Linear warm-up to ``learning_rate``, then cosine decay to ``learning_rate_min``;
        the whole curve times ``lr_scale``."""
        cfg, warmup = self.config, self.lr_warmup_steps
        if warmup > 0 and step < warmup:
            return self.lr_scale * cfg.learning_rate * (step + 1) / warmup
        span = max(self.total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr_scale * (cfg.learning_rate_min
                                + (cfg.learning_rate - cfg.learning_rate_min) * cosine)

    # ---------------------------------------------------------- KL warm-up --
    def _kl_window(self) -> tuple[float, float]:
        return (self.config.kl_const_portion * self.total_steps,
                self.config.kl_anneal_portion * self.total_steps)

    def _kl_progress(self, step: int) -> float:
        """Fraction of the KL anneal done, in [0, 1]; 1 when there is no anneal."""
        const_steps, anneal_steps = self._kl_window()
        if anneal_steps <= 0:
            return 1.0
        return min(max((step - const_steps) / anneal_steps, 0.0), 1.0)

    def kl_warmup(self, step: int) -> float:
        """The warm-up part of the KL weight: max(progress, kl_const_coeff), 1 without anneal."""
        const_steps, anneal_steps = self._kl_window()
        if anneal_steps <= 0:
            return 1.0
        return max(min((step - const_steps) / anneal_steps, 1.0), self.config.kl_const_coeff)

    def kl_weight(self, step: int) -> float:
        """The KL weight of the loss: the warm-up ramp times ``kl_beta``."""
        return self.kl_warmup(step) * self.config.kl_beta

    def balancing(self, step: int) -> bool:
        """KL balancing acts only while the warm-up ramp is below 1 (and when enabled)."""
        return self.config.kl_balance and self.kl_warmup(step) < 1.0

    # --------------------------------------------------------- regulariser --
    def reg_lambda(self, step: int) -> float:
        """lambda of the spectral + BN regulariser.

        With ``weight_decay_norm_anneal`` lambda moves log-linearly (geometrically)
        from ``weight_decay_norm_init`` to ``weight_decay_norm`` over the KL anneal
        (the same window as the KL ramp, so the strong early regularisation fades
        as the KL reaches full weight): exactly the init value up to the end of the
        constant phase, exactly the final value from the end of the anneal.  If one
        end is 0 the log is undefined and the interpolation is linear instead.
        """
        cfg = self.config
        final = cfg.weight_decay_norm
        if not cfg.weight_decay_norm_anneal:
            return final
        init, p = cfg.weight_decay_norm_init, self._kl_progress(step)
        if p >= 1.0:
            return final
        if init <= 0 or final <= 0:
            return (1 - p) * init + p * final
        return math.exp((1 - p) * math.log(init) + p * math.log(final))
