"""The training loop: ``Trainer`` builds a run's parts and ``fit`` runs the loop.

The jobs live in their own modules: ``runtime`` (process, device, seeds),
``schedules`` (learning rate, KL warm-up, regulariser weight), ``step`` (one
optimiser step, EMA, gradient skipping), ``checkpoint`` (the checkpoint
layout), ``logger`` (metrics, read on logging steps only) and ``evaluation``
(validation, images, the final IW NLL).  ``train(config)`` is the one-call
entry point used by ``train.py`` and the ablation script.

Exact resume: a checkpoint holds model, EMA, optimiser, grad-skip history,
spectral power-iteration vectors, every RNG state and the position in the epoch,
so a resumed run continues bit-for-bit (with ``num_workers=0`` and
``deterministic=True``; worker processes reseed their own generators).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from hvae import data as hdata
from hvae import evaluation as ev
from hvae import objectives
from hvae.checkpoint import Checkpointer, DiskFull
from hvae.config import Config, ConfigError
from hvae.errors import RunFailed, exhausted
from hvae.graphed_step import SyncFreeStep, graph_blockers, side_stream
from hvae.healing import Healer, RolledBack, host_copy
from hvae.logger import MetricsLogger
from hvae.model import NVAE
from hvae.model.compile import compile_model
from hvae.model.remat import enable_activation_checkpointing
from hvae.model.sync_bn import convert_sync_batchnorm
from hvae.report import build_report, write_report
from hvae.run_folder import claim_run_folder
from hvae.runtime import (Interrupted, Runtime, StopSignals, choose_fast_path, configure_backends,
                          init_runtime, interrupt_on_signals, runtime_session, seed_everything)
from hvae.schedules import Schedule
from hvae.step import EMA, GradSkipper, StepParts, TrainStep

SAMPLE_TEMPERATURES = (0.6, 0.8, 1.0)
IMAGES_PER_GRID = 64


def build_step_parts(config: Config, runtime: Runtime, model: nn.Module, schedule: Schedule,
                     graphed: bool = False) -> StepParts:
    """The parts of a training step around ``model`` (on its device): the spectral
    regulariser, DDP under torchrun (built on a side stream when the step is
    ``graphed``), Adamax, the EMA (copied before compiling: evaluation stays eager),
    the compiled regions, activation checkpointing, the loss scaler, the skip history."""
    cfg, device = config, runtime.device
    spectral = objectives.SpectralRegularizer(model, cfg.num_power_iter).to(device)
    net = model
    if runtime.distributed:
        # a captured backward holds DDP's all-reduces: PyTorch's CUDA notes ask for DDP
        # to be built on a side stream then
        with side_stream(device) if graphed else contextlib.nullcontext():
            net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate,
                                   weight_decay=cfg.weight_decay, eps=cfg.adamax_eps, foreach=True)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    compile_model(model, cfg.compile)  # after the EMA copy: evaluation stays eager
    enable_activation_checkpointing(model, cfg.activation_checkpointing)  # after compile
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    skipper = GradSkipper(cfg.grad_skip_factor, enabled=cfg.grad_skip, device=device)
    return StepParts(model, net, schedule, optimizer, spectral, ema, skipper, scaler)


def build_step(config: Config, runtime: Runtime, model: nn.Module, schedule: Schedule,
               sync_free: bool | None = None) -> TrainStep:
    """The training step and its parts (``build_step_parts``): the one place that builds
    them, for the Trainer, the benchmark and the GPU checks.

    ``config.cuda_graphs`` "true" (resolved: see ``choose_fast_path``) gives the
    sync-free step captured on CUDA, unless ``graph_blockers`` name what prevents it
    (then the eager step, and the run says why); "false" the eager ``TrainStep``.
    ``sync_free=True`` takes the sync-free step whatever the config says (uncaptured off
    CUDA: the CPU twin of the captured step)."""
    if config.cuda_graphs not in ("true", "false"):
        raise ValueError(f"resolve cuda_graphs={config.cuda_graphs!r} first (choose_fast_path)")
    blockers = graph_blockers(config, runtime) if config.cuda_graphs == "true" else []
    if blockers and runtime.is_main and not sync_free:
        print("--cuda_graphs: taking eager steps instead: " + "; ".join(blockers),
              file=sys.stderr, flush=True)
    capture = config.cuda_graphs == "true" and not blockers
    parts = build_step_parts(config, runtime, model, schedule, graphed=capture)
    if capture or sync_free:
        return SyncFreeStep(parts, config, runtime, capture=runtime.device.type == "cuda")
    return TrainStep(parts, config, runtime)


class SkipBatches(torch.utils.data.Sampler):
    """The wrapped sampler's indices without the first ``skip`` (to resume mid-epoch)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class TrainingDiverged(RunFailed, RuntimeError):
    """The weights became non-finite: the run cannot continue from here (exit code 1)."""


class Trainer:
    """Builds model, optimiser, EMA, step, checkpointer and logger; ``fit`` is the loop."""

    def __init__(self, config: Config, runtime: Runtime | None = None,
                 resume: str | os.PathLike | None = None, progress: bool = True,
                 run_dir: str | os.PathLike | None = None, loaders: tuple | None = None):
        self.runtime = rt = runtime or init_runtime()
        # "auto" performance fields resolved for this device: the fast path on CUDA
        self.config, fast_path = choose_fast_path(config.validate(), rt.device)
        cfg = self.config
        if rt.is_main:
            print(fast_path, file=sys.stderr, flush=True)
        self.progress = progress and rt.is_main
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.out) / cfg.run_name
        configure_backends(rt.device, cfg.deterministic)
        seed_everything(cfg.seed)  # identical model and spectral vectors on every rank
        device = rt.device

        if loaders is None:  # (train, test) may be given directly, e.g. synthetic benchmark data
            loaders = (hdata.build_loader(cfg, "train", distributed=rt.distributed, rank=rt.rank,
                                          world_size=rt.world_size, device=device),
                       hdata.build_loader(cfg, "test", device=device))
        self.train_loader, self.test_loader = loaders
        self.accum = cfg.grad_accum_steps
        # optimiser steps per epoch: each takes ``accum`` loader batches (a remainder is dropped)
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"grad_accum_steps={self.accum} needs at least that many batches per "
                             f"epoch, but the training data gives {len(self.train_loader)} per "
                             "process: lower --grad_accum_steps or --batch_size")
        schedule = Schedule.for_run(cfg, self.steps_per_epoch)

        self.model = NVAE(cfg).to(device)
        self._check_data_fits()
        if cfg.sync_bn and rt.distributed:
            self.model = convert_sync_batchnorm(self.model)
        elif cfg.sync_bn:
            print("--sync_bn: one process, whose BatchNorm statistics already cover the whole "
                  "batch: nothing to synchronise (it acts under torchrun)", file=sys.stderr,
                  flush=True)
        self.train_step_fn = build_step(cfg, rt, self.model, schedule)
        self.parts = self.train_step_fn.parts
        self.healer = Healer(cfg)
        self.checkpointer = Checkpointer(self.run_dir, enabled=rt.is_main)
        self.logger = MetricsLogger(self.run_dir, enabled=rt.is_main)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0  # batch_in_epoch: loader batches
        self.best = math.inf
        self.signals = StopSignals(verbose=False)  # replaced by an active one inside fit()
        seed_everything(cfg.seed + 1 + rt.rank)  # per-rank noise streams
        self.phase = "training"  # or "evaluation", "the final importance-weighted test pass"
        self.last_checkpoint: tuple[Path, int] | None = None  # (file, step) a resume would use
        if resume:
            Checkpointer.restore(self, resume, rank=rt.rank if rt.distributed else 0)
            self.last_checkpoint = (Path(resume), self.step)
            self._scale_learning_rate(self.healer.lr_scale)  # the heals before the stop

    # the parts the loop, evaluation and checkpoints use (hvae.step.StepParts)
    schedule = property(lambda self: self.parts.schedule)
    spectral = property(lambda self: self.parts.spectral)
    optimizer = property(lambda self: self.parts.optimizer)
    ema = property(lambda self: self.parts.ema)
    scaler = property(lambda self: self.parts.scaler)
    skipper = property(lambda self: self.parts.skipper)

    def _check_data_fits(self) -> None:
        """Fail before training when the data's shape is not the one the config describes."""
        x = next(iter(self.test_loader))
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"dataset {self.config.dataset!r} gives images of shape "
                             f"{tuple(x.shape[1:])} but the config expects {expected} "
                             "(set --in_channels / --image_size to match the data)")

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    @property
    def global_batch(self) -> int:
        """Images per optimiser step over all processes."""
        return self.config.batch_size * self.accum * self.runtime.world_size

    def train_step(self, x: torch.Tensor | list[torch.Tensor],
                   stop_requested: bool | Any = False) -> dict[str, Any]:
        """One optimiser step at ``self.step`` on a batch or a list of micro-batches;
        metrics as device tensors (no host sync)."""
        metrics = self.train_step_fn(x, self.step, stop_requested=stop_requested)
        self.step += 1
        return metrics

    def save(self, name: str = "checkpoint.pt") -> None:
        """Write a checkpoint (main process).  ``checkpoint.pt``, written while the run
        looks healthy, is also the good state a heal rolls back to: every process keeps a
        host copy of it."""
        if name == "checkpoint.pt" and self.healer.enabled:
            state = host_copy(Checkpointer.state(self))
            if not self.healer.suspect:  # not a state to come back to
                self.healer.good_state = state
            self.checkpointer.save(self, name, state=state)
        else:
            self.checkpointer.save(self, name)
        if name == "checkpoint.pt" and self.runtime.is_main:
            self.last_checkpoint = (self.run_dir / name, self.step)

    def _scale_learning_rate(self, scale: float) -> None:
        self.parts.schedule = dataclasses.replace(self.parts.schedule, lr_scale=scale)

    def resource_failure(self, err: BaseException) -> RunFailed | None:
        """``err`` as one line when a resource ran out (None otherwise): which one, where,
        what is saved, and what to try."""
        resource = exhausted(err)
        if resource is None:
            return None
        cfg = self.config
        saved = ("no checkpoint was saved yet" if self.last_checkpoint is None else
                 f"the last checkpoint is {self.last_checkpoint[0]} (step {self.last_checkpoint[1]})")
        if resource == "disk space":
            what = str(err) if isinstance(err, DiskFull) else "no space left on device"
            return RunFailed(f"{what} at step {self.step}; {saved}: free space there, or copy "
                             "the run folder to a disk with room and continue with --resume "
                             "(--out there)")
        if resource == "device memory":
            resource = f"GPU memory ({self.runtime.device})"
        if self.phase.startswith("the final"):
            return RunFailed(
                f"out of {resource} in {self.phase} (K={cfg.num_iw_samples}, batch "
                f"{cfg.batch_size}); training is finished and {saved}: evaluate it with "
                "evaluate.py --mode nll and a smaller --batch-size or --iw-chunk")
        return RunFailed(
            f"out of {resource} at step {self.step} ({self.phase}, batch {cfg.batch_size}); "
            f"{saved}: try a smaller --batch_size (--grad_accum_steps keeps the global batch), "
            "--activation_checkpointing true or --amp bf16"
            + (", with --resume" if self.last_checkpoint else ""))

    # ---------------------------------------------------------------- the loop
    def epoch_batches(self) -> Iterator[torch.Tensor]:
        """This epoch's batches, starting after those already done (mid-epoch resume).

        The loader is rebuilt with its own per-epoch generator: creating an iterator
        then draws no number from the global RNG, so a resumed run's random stream
        stays aligned with an uninterrupted one.
        """
        loader, sampler = self.train_loader, self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
        return iter(torch.utils.data.DataLoader(
            loader.dataset, batch_size=loader.batch_size,
            sampler=SkipBatches(sampler, self.batch_in_epoch * loader.batch_size),
            num_workers=loader.num_workers, pin_memory=loader.pin_memory,
            drop_last=loader.drop_last, collate_fn=loader.collate_fn, generator=generator))

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` (or ``stop_at_step``, which simulates a pre-emption).

        SIGTERM / Ctrl-C only set a flag: the loop stops at the next step
        boundary (or between evaluation batches), after saving, and raises
        ``Interrupted``; ``--resume`` then continues bit for bit.
        """
        cfg = self.config
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.run_name,
                       dynamic_ncols=True)
        start, start_step = time.time(), self.step
        if self.runtime.is_main:
            print(f"global batch {self.global_batch} = batch_size {cfg.batch_size} x "
                  f"grad_accum_steps {self.accum} x {self.runtime.world_size} process(es)",
                  file=sys.stderr, flush=True)
            if cfg.max_steps:
                print(self._what_ends_the_run(), file=sys.stderr, flush=True)
        if self.healer.enabled and self.healer.good_state is None:
            self.healer.good_state = host_copy(Checkpointer.state(self))  # before any step
        with StopSignals(verbose=self.runtime.is_main) as self.signals:
            try:
                summary = self._train_and_evaluate(bar, stop_at_step)
            finally:
                if bar is not None:
                    bar.close()
        if summary.get("stopped"):
            return summary
        elapsed = summary.pop("train_seconds_until_final") - start
        summary.update(steps=self.step, train_seconds=elapsed,
                       images_per_second=(self.step - start_step) * self.global_batch
                       / max(elapsed, 1e-9),
                       skipped_steps=int(self.skipper.skipped))
        return summary

    def _train_and_evaluate(self, bar, stop_at_step: int | None) -> dict[str, Any]:
        """The epochs, then the final evaluation, started again from the restored
        position after each heal."""
        cfg = self.config
        while True:
            try:
                while self.step < self.total_steps:
                    if self._train_epoch(bar, stop_at_step):
                        return {"step": self.step, "stopped": True}
                    if self.batch_in_epoch >= self.steps_per_epoch * self.accum:  # epoch complete
                        if (self.epoch + 1) % cfg.eval_every == 0 and self.step < self.total_steps:
                            self.end_of_epoch()
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                trained = time.time()
                return {**self.end_of_epoch(final=True), "train_seconds_until_final": trained}
            except RolledBack:
                self.phase = "training"
                if bar is not None:
                    bar.n = self.step
                    bar.refresh()
                if self.signals.requested:  # the heal saved the restored state
                    self._announce_stop()
                    raise Interrupted(self.signals.signum) from None

    def _what_ends_the_run(self) -> str:
        """Which of --max_steps and --epochs ends the run (both given: the earlier)."""
        cfg, epoch_steps = self.config, self.config.epochs * self.steps_per_epoch
        if cfg.max_steps < epoch_steps:
            return (f"--max_steps {cfg.max_steps} ends the run, before the {cfg.epochs} "
                    f"epoch(s) of --epochs ({epoch_steps} steps of {self.steps_per_epoch}); "
                    f"the schedules are fitted to {cfg.max_steps} steps")
        return (f"--epochs {cfg.epochs} ends the run at step {epoch_steps} "
                f"({self.steps_per_epoch} per epoch), before --max_steps {cfg.max_steps}")

    def _train_epoch(self, bar, stop_at_step: int | None) -> bool:
        """The rest of this epoch's steps; True when stopped at ``stop_at_step``."""
        cfg = self.config
        batches = self.epoch_batches()
        while self.step < self.total_steps:
            if self.batch_in_epoch + self.accum > self.steps_per_epoch * self.accum:
                return False
            try:  # the step's micro-batches (a few images each: cheap to hold)
                micro = [next(batches) for _ in range(self.accum)]
            except hdata.DataError:  # a corrupt item: keep the steps done so far, then stop
                self._save_checked()
                raise
            except StopIteration:
                return False
            # a signal that arrives between micro-batches stops after this step's update
            metrics = self.train_step(micro, stop_requested=lambda: self.signals.requested)
            self.batch_in_epoch += self.accum
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0:  # the loop's only host reads
                logged = self.logger.log(metrics, self.step, self.epoch)
                self._check_health(logged)
                if bar is not None:
                    bar.set_postfix(nelbo=f"{logged['nelbo']:.2f}", bpd=f"{logged['bpd']:.3f}",
                                    kl=f"{logged['kl']:.1f}", skip=logged["skipped_total"])
            if self.step % cfg.checkpoint_every == 0 or metrics["stop"]:
                self._save_checked()
            if metrics["stop"]:
                self._announce_stop()
                raise Interrupted(self.signals.signum or signal.SIGTERM)
            if self.step == stop_at_step:
                self._save_checked()
                return True
        return False

    def _check_health(self, logged: dict[str, Any] | None = None) -> None:
        """Heal (``hvae.healing``), or stop with the step and the last good checkpoint,
        once the run went wrong: an update made a weight non-finite (every later step
        would be skipped and the run would 'succeed'), or, on logging steps
        (``logged``: the host values), the updates stalled or the loss exploded."""
        reason = self.healer.diagnose(
            self.step, self.train_step_fn.weights_are_finite(),
            skipped_total=None if logged is None else logged["skipped_total"],
            loss=None if logged is None else logged["loss"])
        if self.runtime.distributed:  # the losses differ between ranks: heal on all or
            # none, and keep the same good state on all
            flags = torch.tensor([reason is not None, self.healer.suspect], dtype=torch.int32,
                                 device=self.runtime.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            heal_any, suspect_any = flags.tolist()  # HOST SYNC: logging and checkpoint steps only
            self.healer.suspect = bool(suspect_any)
            if heal_any and reason is None:
                reason = "another process's training loss exploded"
        if reason is None:
            return
        if self.healer.attempts_left > 0 and self.healer.good_state is not None:
            self._heal(reason)
        if reason.startswith("the weights") or self.healer.enabled:
            raise self._diverged(reason)

    def _diverged(self, reason: str) -> TrainingDiverged:
        last = self.run_dir / "checkpoint.pt"
        clip = "" if self.config.grad_clip else " or set --grad_clip"  # only when it is off
        when = (f"at or before step {self.step}" if reason.startswith("the weights")
                else f"at step {self.step}")
        heals = self.healer.heals
        tried = (f"; {len(heals)} heal(s) did not help (the learning rate is x"
                 f"{self.healer.lr_scale:g} now)" if heals else "")
        return TrainingDiverged(
            f"{reason} {when} (learning rate {self.schedule.learning_rate(max(self.step - 1, 0)):.3g})"
            f"{tried}; the last good checkpoint is {last if last.exists() else 'not written yet'}: "
            f"lower --learning_rate{clip}")

    def _heal(self, reason: str) -> None:
        """Roll back to the good state, lower the learning rate, say so and save; raises
        ``RolledBack`` so that the loop restarts from the restored position."""
        at, best, rank = self.step, self.best, self.runtime.rank if self.runtime.distributed else 0
        Checkpointer.load_state(self, host_copy(self.healer.good_state), "the last good state",
                                rank=rank, own_rng=True)
        self.best = best  # checkpoint_best.pt stays the best seen
        record = self.healer.heal(at, reason, self.step, int(self.skipper.skipped))
        self._scale_learning_rate(self.healer.lr_scale)
        self.train_step_fn.release_graph()  # its optimiser state was replaced
        if self.runtime.is_main:
            print(f"heal {record['heal']}/{self.config.heal_attempts} at step {at}: {reason}; "
                  f"rolled back to step {self.step} and going on with the learning rate "
                  f"x{self.healer.lr_scale:g} (--heal false turns healing off)",
                  file=sys.stderr, flush=True)
        self.logger.log({"heals": record["heal"], "lr_scale": record["lr_scale"],
                         "rolled_back_to": self.step}, at, self.epoch, split="heal")
        self.save()  # the restored state with its heal history: a resume goes on from here
        raise RolledBack

    def _save_checked(self, name: str = "checkpoint.pt") -> None:
        """Save, but never weights that are no longer finite (heal instead)."""
        self._check_health()
        self.save(name)

    def _announce_stop(self) -> None:
        if self.runtime.is_main:
            print(f"stopped at step {self.step}: checkpoint saved to "
                  f"{self.run_dir / 'checkpoint.pt'}; continue with --resume", file=sys.stderr,
                  flush=True)

    # ---------------------------------------------------------------- evaluation
    def end_of_epoch(self, final: bool = False) -> dict[str, Any]:
        """Validate, keep the best checkpoint, write images; at the end also the IW NLL.

        Runs at a step boundary (the epoch complete, not yet advanced), so a stop
        during it saves that state and a resumed run repeats the evaluation.  A
        captured training step gives its graph's memory back first (``--cuda_graphs``):
        evaluation then has what it has after eager steps.
        """
        self.train_step_fn.release_graph()
        self._check_health()  # not evaluating weights a heal would replace
        self.phase = "evaluation"  # kept when it fails: resource_failure says where
        try:
            metrics = self._evaluate_and_save(final)
        except Interrupted:
            self._save_checked()
            self._announce_stop()
            raise
        self.phase = "training"
        return metrics

    def _evaluate_and_save(self, final: bool) -> dict[str, Any]:
        rt, cfg = self.runtime, self.config
        metrics = {}
        stop = self.signals.check  # evaluation batches end early on a signal
        if rt.is_main:
            metrics = ev.test_metrics(self.eval_model, self.test_loader, amp=cfg.amp,
                                      max_batches=cfg.eval_batches, seed=cfg.seed, between=stop)
            self.logger.log(metrics, self.step, self.epoch, split="test")
            if metrics["test_nelbo"] < self.best:
                self.best = metrics["test_nelbo"]
                self.save("checkpoint_best.pt")
            self.save_images()
        self._save_checked()
        stop()
        if final:  # every rank evaluates its own shard of the test set; sums are all-reduced
            self.phase = "the final importance-weighted test pass"
            loader = (hdata.build_loader(cfg, "test", distributed=True, rank=rt.rank,
                                         world_size=rt.world_size, device=rt.device)
                      if rt.distributed else self.test_loader)
            iw = ev.iw_log_likelihood(self.eval_model, loader, cfg.num_iw_samples,
                                      device=rt.device, progress=self.progress,
                                      max_batches=cfg.eval_batches, distributed=rt.distributed,
                                      seed=cfg.seed, between=stop)
            if rt.is_main:
                iw = {f"iw_{k}": v for k, v in iw.items()}
                metrics.update(iw)
                self.logger.log(iw, self.step, self.epoch, split="test")
                self.logger.flush()
                self.write_report(metrics)
        self.logger.flush()
        return metrics

    def write_report(self, metrics: dict) -> None:
        """report.html and report.json in the run folder (``hvae.report``), from the final
        evaluation's numbers, with samples, reconstructions and the training curves."""
        report, images = build_report(
            self.eval_model, self.config, self.test_loader, num_iw_samples=self.config.num_iw_samples,
            metrics=metrics, metrics_file=self.run_dir / "metrics.jsonl",
            max_batches=self.config.eval_batches, seed=self.config.seed, step=self.step)
        write_report(self.run_dir, report, images)

    def save_images(self) -> None:
        """Sample grids at several temperatures, and test inputs above their reconstructions
        (inputs spread evenly over the test set, which may be ordered by class)."""
        from torchvision.utils import make_grid, save_image
        model, nrow = self.eval_model, int(math.sqrt(IMAGES_PER_GRID))
        for t in SAMPLE_TEMPERATURES:
            images = ev.generate(model, IMAGES_PER_GRID, t=t, seed=self.config.seed)
            save_image(images, self.run_dir / f"samples_t{t:.1f}.png", nrow=nrow)
            self.logger.add_image(f"samples/t{t:.1f}", make_grid(images, nrow=nrow), self.step)
        x = ev.evenly_spaced(self.test_loader.dataset, IMAGES_PER_GRID // 2).to(self.runtime.device)
        with ev.seeded(self.config.seed, self.runtime.device):  # the run's RNG stays untouched
            recons = ev.reconstruct(model, x)["recons"]  # rows 1, 3, ...: inputs; 2, 4, ...: recons
        grid = ev.interleave_rows(x.float().cpu(), recons.cpu(), nrow=nrow)
        save_image(grid, self.run_dir / "reconstructions.png", nrow=nrow)
        self.logger.add_image("reconstructions", make_grid(grid, nrow=nrow), self.step)


def train(config: Config, resume: str | os.PathLike | None = None, progress: bool = True,
          stop_at_step: int | None = None, device: str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train ``config`` (under torchrun when launched so) and return the final metrics.

    The run folder is owned while training (``hvae.run_folder``, rank 0): a new run
    refuses a folder that holds another run unless ``overwrite``, and a second live
    process is kept out."""
    run_dir = Path(config.out) / config.run_name
    with runtime_session(device) as runtime, \
            (claim_run_folder(run_dir, resume, overwrite) if runtime.is_main
             else contextlib.nullcontext()), interrupt_on_signals():
        try:
            trainer = Trainer(config, runtime, resume=resume, progress=progress)
        except Interrupted as stop:
            if runtime.is_main:
                print(f"{signal.Signals(stop.signum).name}: stopped before the first step; "
                      "nothing was saved", file=sys.stderr, flush=True)
            raise
        try:
            return trainer.fit(stop_at_step=stop_at_step)
        except Exception as err:
            failure = trainer.resource_failure(err)
            if failure is None:
                raise
            raise failure from err
        finally:
            trainer.logger.close()
