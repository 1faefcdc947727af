"""Self-healing training (hvae/healing.py): what it diagnoses, that a run with a far
too high learning rate heals and completes, that ``--heal false`` stops as before, and
that a heal in the history does not break exact resume."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from hvae.checkpoint import load_checkpoint
from hvae.config import preset
from hvae.healing import Healer, uniform_nelbo
from hvae.runtime import Runtime
from hvae.training import Trainer, TrainingDiverged, train
from test_training import (STOP_RUN, _assert_same_run, _final_state, digit_folder,  # noqa: F401
                           folder_config, short_skip_history, tiny)


# ------------------------------------------------------------------ the Healer --
def test_uniform_nelbo_is_the_nats_of_a_uniform_guess():
    assert uniform_nelbo(preset("mnist")) == pytest.approx(28 * 28 * math.log(2))
    assert uniform_nelbo(preset("demo")) == pytest.approx(28 * 28 * math.log(2))
    assert uniform_nelbo(preset("cifar10")) == pytest.approx(3 * 32 * 32 * 8 * math.log(2))


def _healer(**overrides):
    return Healer(preset("demo", heal_window=20, heal_skip_rate=0.5, **overrides))


def test_a_stall_heals_once_the_window_is_mostly_skipped():
    healer = _healer()
    assert healer.diagnose(10, True, skipped_total=0, loss=300.0) is None
    assert healer.diagnose(20, True, skipped_total=6, loss=300.0) is None  # 6 of 20
    assert healer.suspect  # 6 of the last 10: not a state to come back to
    assert healer.diagnose(30, True, skipped_total=9, loss=300.0) is None  # 9 of the last 20
    assert not healer.suspect  # 3 of the last 10
    reason = healer.diagnose(40, True, skipped_total=20, loss=300.0)
    assert reason and "stalled: 14 of the last 20" in reason


def test_a_loss_spike_is_not_healed_but_a_loss_that_stays_exploded_is():
    healer, limit = _healer(), 10 * uniform_nelbo(preset("demo"))
    assert healer.diagnose(10, True, 0, loss=2 * limit) is None and healer.suspect
    assert healer.diagnose(20, True, 0, loss=300.0) is None and not healer.suspect  # recovered
    assert healer.diagnose(30, True, 0, loss=2 * limit) is None
    assert healer.diagnose(40, True, 0, loss=3 * limit) is None
    reason = healer.diagnose(50, True, 0, loss=3 * limit)
    assert reason and "stayed above 10 times" in reason and "for 20 steps" in reason
    assert _healer(heal_loss_limit=0).diagnose(50, True, 0, loss=1e30) is None  # check off


def test_non_finite_weights_heal_and_the_history_round_trips():
    healer = _healer()
    assert healer.diagnose(7, False) == "the weights became non-finite"
    record = healer.heal(7, "the weights became non-finite", restored_step=4, skipped_total=1)
    assert record == {"heal": 1, "step": 7, "rolled_back_to": 4,
                      "reason": "the weights became non-finite", "lr_scale": 0.5}
    assert healer.attempts_left == 7
    copy = _healer()
    copy.load_state_dict(json.loads(json.dumps(healer.state_dict())))  # plain values
    assert copy.state_dict() == healer.state_dict() and copy.lr_scale == 0.5
    assert Healer(preset("demo", heal=False)).attempts_left == 0


# ------------------------------------------------------------- whole runs --
HOT = dict(max_steps=60, log_every=5, heal_window=20, checkpoint_every=20, num_iw_samples=1,
           eval_batches=1)


def test_a_far_too_high_learning_rate_heals_and_completes(tmp_path, capsys):
    """The demo model at 50x its learning rate: without healing its loss explodes to
    about 1e6 nats (a uniform guess is 543) and stays there to the end; healing rolls
    back, lowers the rate and ends with a model that learned."""
    cfg = tiny(tmp_path, learning_rate=50 * preset("demo").learning_rate, **HOT)
    summary = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "heal 1/8 at step" in err and "rolled back to step" in err, err
    assert math.isfinite(summary["test_nelbo"]) and summary["test_nelbo"] < uniform_nelbo(cfg)
    state = _final_state(cfg)
    heals = state["heal"]["heals"]
    assert heals and heals[0]["heal"] == 1 and state["heal"]["lr_scale"] == 0.5 ** len(heals)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = [json.loads(l) for l in (Path(cfg.out) / cfg.run_name / "metrics.jsonl").open()]
    heal_rows = [r for r in rows if r["split"] == "heal"]
    assert [r["heals"] for r in heal_rows] == list(range(1, len(heals) + 1))


def test_heal_false_stops_at_non_finite_weights_without_healing(tmp_path, capsys):
    cfg = tiny(tmp_path, max_steps=6, learning_rate=1e30, grad_clip=0.0, checkpoint_every=1,
               log_every=2, grad_skip=False, heal=False)
    with pytest.raises(TrainingDiverged, match="non-finite at or before step 1") as error:
        train(cfg, progress=False)
    assert "heal" not in str(error.value) and "heal" not in capsys.readouterr().err


def test_after_the_last_attempt_the_run_stops_and_says_the_heals_did_not_help(tmp_path):
    cfg = tiny(tmp_path, max_steps=6, learning_rate=1e30, grad_clip=0.0, checkpoint_every=1,
               log_every=2, grad_skip=False, heal_attempts=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite .*2 heal\(s\) did not help"):
        train(cfg, progress=False)
    assert len(_final_state(cfg)["heal"]["heals"]) == 2


def _poison_once(trainer, at_step: int):
    """After the optimiser update of step ``at_step`` (0-based), one weight becomes NaN:
    the next health check heals.  Once only: the healed run goes on cleanly."""
    def hook(optimizer, args, kwargs):
        if trainer.step == at_step and not hasattr(hook, "fired"):
            hook.fired = True
            with torch.no_grad():
                weight = next(trainer.model.parameters())
                weight[(0,) * weight.dim()] = math.nan
    trainer.optimizer.register_step_post_hook(hook)


def test_a_run_stopped_after_a_heal_resumes_exactly(tmp_path, digit_folder):  # noqa: F811
    """The reference heals at step 5 (back to the checkpoint of step 4, at half the
    learning rate); the other run heals the same way, is stopped by SIGTERM in a later
    step, and resumes: both end in the same state, heal history included."""
    import signal

    from hvae.training import Interrupted

    def run(folder, stop: bool):
        cfg = folder_config(folder, digit_folder, **STOP_RUN)
        with short_skip_history():
            trainer = Trainer(cfg, Runtime(), progress=False)
            _poison_once(trainer, at_step=4)
            if stop:
                def forward_hook(module, args):  # the first forward at step 5: after the heal
                    if trainer.step == 5 and module.training:
                        os.kill(os.getpid(), signal.SIGTERM)
                trainer.model.register_forward_pre_hook(forward_hook)
                with pytest.raises(Interrupted):
                    trainer.fit()
                stopped = _final_state(cfg)
                assert stopped["step"] == 6 and len(stopped["heal"]["heals"]) == 1
                train(cfg, progress=False, resume=Path(cfg.out) / cfg.run_name / "checkpoint.pt")
            else:
                trainer.fit()
        return cfg

    reference, resumed = run(tmp_path / "a", stop=False), run(tmp_path / "b", stop=True)
    heals = _final_state(reference)["heal"]["heals"]
    assert [(h["step"], h["rolled_back_to"], h["lr_scale"]) for h in heals] == [(5, 4, 0.5)]
    _assert_same_run(reference, resumed)
