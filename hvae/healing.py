"""Self-healing training: roll back to the last good state, lower the learning rate, go on.

Deep hierarchical VAEs diverge: the weights turn non-finite, or every update is
skipped from some step on and the run stalls while it seems to train, or the
loss explodes and stays there.  Resuming does not help (the same state, the same
learning rate, the same data).  ``Healer`` notices each of these where the loop
already reads the device (logging and checkpoint steps: no host sync is added
to the step), and the Trainer then:

1. loads the last good state, a host copy of the last checkpoint written (or of
   the start of training), with its data position and RNG states;
2. multiplies the learning-rate curve by ``heal_lr_factor`` from there on;
3. says so: a line on stderr, a ``heal/*`` TensorBoard scalar and metrics.jsonl
   row, and the history in every later checkpoint (``Healer.state_dict``).

After ``heal_attempts`` heals the next failure stops the run with an error that
names the last good checkpoint, as a run without healing does.

Exact resume: the healer's state (learning-rate factor, heals, the skip counts of
the window) is in the checkpoint, so a run stopped after a heal and resumed goes
on as the uninterrupted one.  The rollback target of a resumed run is its resume
point until it writes its next checkpoint (the uninterrupted run's may be
earlier): the two runs differ only if a heal is needed in between.

The good state costs host memory: one checkpoint's size (weights, EMA, Adamax
state), kept on every process.  ``--heal false`` keeps none.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from hvae.config import Config


class RolledBack(Exception):
    """Raised by the Trainer after a heal: the loop restarts from the restored position."""


def uniform_nelbo(config: Config) -> float:
    """Nats per image of a uniform guess over the data's values: log(2) per pixel for
    binary images, log(2^num_x_bits) per colour value otherwise.  Any model that
    learned anything is far below it."""
    dims = config.in_channels * config.image_size ** 2
    return dims * (math.log(2) if config.binary else config.num_x_bits * math.log(2))


def host_copy(state: Any) -> Any:
    """``state`` (nested dicts, lists and tensors) with every tensor copied to the CPU,
    so that training in place cannot change it (``load_state_dict`` may keep the
    tensors it is given)."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


class Healer:
    """Diagnoses a run at its logging and checkpoint steps and keeps its heal history.

    ``good_state`` is the host copy the Trainer rolls back to: the last checkpoint
    written while the run looked healthy (``suspect`` False).  ``marks`` are
    (step, skipped updates so far) at the logging steps since the last rollback:
    the skip rate over the last ``heal_window`` steps comes from them.
    """

    def __init__(self, config: Config):
        self.config = config
        self.enabled = config.heal
        self.lr_scale = 1.0
        self.heals: list[dict[str, Any]] = []   # one record per heal (see ``heal``)
        self.marks: list[tuple[int, int]] = [(0, 0)]
        self.good_state: dict[str, Any] | None = None
        self.high_loss_since: int | None = None  # first logging step of a high-loss streak
        # the last logging step saw a high loss or mostly skipped updates since the one
        # before: a checkpoint written now is not a good state to come back to
        self.suspect = False
        self.loss_limit = config.heal_loss_limit * uniform_nelbo(config)

    # ------------------------------------------------------------ diagnosis
    def diagnose(self, step: int, weights_finite: bool, skipped_total: int | None = None,
                 loss: float | None = None) -> str | None:
        """Why the run must heal at ``step`` (None: it is healthy).  ``skipped_total``
        and ``loss`` are given on logging steps (the logged host values)."""
        if not weights_finite:
            return "the weights became non-finite"
        window = self.config.heal_window
        if loss is not None:
            self.suspect = False
        if loss is not None and self.config.heal_loss_limit:
            # a loss over the limit at every logging step for a window: exploded and
            # stayed there (a spike the run recovers from is not healed)
            if loss < self.loss_limit:
                self.high_loss_since = None
            else:
                self.suspect = True
                if self.high_loss_since is None:
                    self.high_loss_since = step
                if step - self.high_loss_since >= window:
                    return (f"the training loss stayed above {self.config.heal_loss_limit:g} "
                            f"times a uniform guess's ({uniform_nelbo(self.config):.4g} nats "
                            f"per image) for {step - self.high_loss_since} steps: {loss:.4g}")
        if skipped_total is None:
            return None
        skipped_total = int(skipped_total)
        last_step, last_skipped = self.marks[-1]
        if skipped_total - last_skipped > self.config.heal_skip_rate * max(step - last_step, 1):
            self.suspect = True
        earlier = [m for m in self.marks if m[0] <= step - window]
        stalled = None
        if earlier:
            since, skipped_then = earlier[-1]
            rate = (skipped_total - skipped_then) / max(step - since, 1)
            if rate > self.config.heal_skip_rate:
                stalled = (f"updates stalled: {skipped_total - skipped_then} of the last "
                           f"{step - since} were skipped")
        # keep the newest mark at least a window old, and the newer ones
        self.marks = ([earlier[-1]] if earlier else []) + [m for m in self.marks
                                                           if m[0] > step - window]
        self.marks.append((step, skipped_total))
        return stalled

    # --------------------------------------------------------------- healing
    @property
    def attempts_left(self) -> int:
        return self.config.heal_attempts - len(self.heals) if self.enabled else 0

    def heal(self, step: int, reason: str, restored_step: int, skipped_total: int) -> dict:
        """Record a heal at ``step`` that rolled back to ``restored_step``: lower the
        learning rate and restart the skip window there.  Returns the record."""
        self.lr_scale *= self.config.heal_lr_factor
        record = {"heal": len(self.heals) + 1, "step": step, "rolled_back_to": restored_step,
                  "reason": reason, "lr_scale": self.lr_scale}
        self.heals.append(record)
        self.marks = [(restored_step, int(skipped_total))]
        self.high_loss_since, self.suspect = None, False
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "heals": [dict(h) for h in self.heals],
                "marks": [list(m) for m in self.marks], "high_loss_since": self.high_loss_since,
                "suspect": self.suspect}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.heals = [dict(h) for h in state["heals"]]
        self.marks = [(int(a), int(b)) for a, b in state["marks"]]
        self.high_loss_since = state.get("high_loss_since")
        self.suspect = bool(state.get("suspect", False))
