"""The training loop: one Trainer that owns model, optimiser, EMA and run folder.

Read top to bottom: ``Runtime`` (which process and device), the learning-rate and
EMA helpers, ``GradSkipper`` (which updates to drop), then ``Trainer`` with
``train_step`` / ``evaluate`` / ``save`` / ``load`` / ``fit``.  ``train(config)``
is the one-call entry point used by ``train.py`` and the ablation script.

Exact resume: a checkpoint holds model, EMA, optimiser, grad-skip history,
spectral power-iteration vectors, every RNG state and the position in the epoch,
so a resumed run continues bit-for-bit (with ``num_workers=0`` and
``deterministic=True``; worker processes reseed their own generators).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from hvae import data as hdata
from hvae import objectives
from hvae.checkpoint import (CheckpointError, describe_mismatch, load_checkpoint,
                             save_checkpoint)
from hvae.config import Config
from hvae.model import NVAE

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where this process runs: rank and world size under torchrun, and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str | None = None) -> Runtime:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU; no fixed ports assumed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return Runtime(rank, world_size, local_rank, dev)


# --------------------------------------------------------------------------- schedules
def learning_rate(step: int, total_steps: int, warmup_steps: int, config: Config) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``learning_rate_min``."""
    if warmup_steps > 0 and step < warmup_steps:
        return config.learning_rate * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.learning_rate_min + (config.learning_rate - config.learning_rate_min) * cosine


class EMA:
    """Exponential moving average of the weights (buffers are copied), used for evaluation.

    The decay ramps up as min(decay, (1 + step) / (10 + step)) so that early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


class GradSkipper:
    """Decides which updates to drop: non-finite gradient norms always, outliers sometimes.

    An update is an outlier when its norm exceeds ``factor`` times the median of the
    recent accepted norms.  The threshold cannot stall training: after ``patience``
    consecutive outliers the next one is accepted, so the history follows a real
    change of scale.
    """

    def __init__(self, factor: float, enabled: bool = True, history: int = 100,
                 warmup: int = 20, patience: int = 5):
        self.factor, self.enabled, self.warmup, self.patience = factor, enabled, warmup, patience
        self.norms: deque[float] = deque(maxlen=history)
        self.consecutive = 0
        self.skipped = 0

    def should_skip(self, norm: float) -> bool:
        if not math.isfinite(norm):
            skip = True
        elif self.enabled and len(self.norms) >= self.warmup and self.consecutive < self.patience:
            skip = norm > self.factor * statistics.median(self.norms)
        else:
            skip = False
        if skip:
            self.consecutive += 1
            self.skipped += 1
        else:
            self.consecutive = 0
            self.norms.append(norm)
        return skip

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms.clear()
        self.norms.extend(float(n) for n in state["norms"])
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


class Interrupted(Exception):
    """Raised by the SIGTERM handler so that a pre-empted job saves like Ctrl-C."""


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Owns everything a run needs; ``fit`` is the loop."""

    def __init__(self, config: Config, runtime: Runtime | None = None,
                 resume: str | os.PathLike | None = None, progress: bool = True,
                 run_dir: str | os.PathLike | None = None, loaders: tuple | None = None):
        self.config = config.validate()
        self.runtime = runtime or init_runtime()
        self.progress = progress and self.runtime.is_main
        self.run_dir = Path(run_dir) if run_dir else Path(config.out) / config.run_name
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(config.seed)  # identical model and spectral vectors on every rank
        device = self.runtime.device

        if loaders is None:  # (train, test) may be given directly, e.g. synthetic benchmark data
            loaders = (hdata.build_loader(config, "train", distributed=self.runtime.distributed,
                                          rank=self.runtime.rank, world_size=self.runtime.world_size,
                                          device=device),
                       hdata.build_loader(config, "test", device=device))
        self.train_loader, self.test_loader = loaders
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.warmup_steps = int(config.warmup_epochs * self.steps_per_epoch)

        self.model = NVAE(config).to(device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._check_data_fits()
        if config.sync_bn and self.runtime.distributed:
            if device.type == "cpu":
                raise ValueError("sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.spectral = objectives.SpectralRegularizer(self.model, config.num_power_iter).to(device)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
                    if self.runtime.distributed else self.model)
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=config.learning_rate,
                                            weight_decay=config.weight_decay, eps=config.adamax_eps,
                                            foreach=True)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.amp_dtype = AMP_DTYPES.get(config.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.skipper = GradSkipper(config.grad_skip_factor, enabled=config.grad_skip)
        self._bn_buffers = [b for m in self.model.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)
                            for b in (m.running_mean, m.running_var) if b is not None]
        self._bn_backup = [b.clone() for b in self._bn_buffers]
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best = math.inf
        self.writer = None
        seed_everything(config.seed + 1 + self.runtime.rank)  # per-rank noise streams
        if resume:
            self.load(resume)

    # ---------------------------------------------------------------- checks
    def _check_data_fits(self) -> None:
        """Fail before training when the data's shape is not the one the config describes."""
        x = next(iter(self.test_loader))
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"dataset {self.config.dataset!r} gives images of shape "
                             f"{tuple(x.shape[1:])} but the config expects {expected} "
                             "(set --in_channels / --image_size to match the data)")

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    # ---------------------------------------------------------------- one step
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor) -> dict[str, Any]:
        """Forward, loss, backward, and (unless skipped) one optimiser update."""
        lr = learning_rate(self.step, self.total_steps, self.warmup_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.forward_backward(x)
        loss_value = loss.loss.item()
        norm, skip = self.update(loss_is_finite=math.isfinite(loss_value))
        return {"loss": loss_value, "nelbo": float(loss.nelbo.mean()),
                "recon": float(loss.recon.mean()),
                "bpd": float(objectives.bits_per_dim(loss.nelbo.mean(), self.model.data_dims)),
                "kl": float(sum(loss.kl_groups)), "kl_coeff": float(loss.kl_coeff),
                "kl_groups": [float(k) for k in loss.kl_groups],
                "kl_coeffs": [float(c) for c in loss.kl_coeffs],
                "reg": float(loss.reg), "reg_spectral": float(loss.reg_spectral),
                "reg_bn": float(loss.reg_bn), "reg_lambda": float(loss.reg_lambda),
                "lr": lr, "grad_norm": norm, "skipped": skip,
                "skipped_total": self.skipper.skipped}

    def forward_backward(self, x: torch.Tensor) -> objectives.Loss:
        """The regularised loss of one batch, back-propagated (gradients averaged over ranks)."""
        cfg = self.config
        x = x.to(self.runtime.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        torch._foreach_copy_(self._bn_backup, self._bn_buffers)
        self.model.train()
        with self.autocast():
            output = self.ddp(x)
        loss = objectives.compute_loss(output, x, step=self.step, total_steps=self.total_steps,
                                       config=cfg, data_dims=self.model.data_dims,
                                       spectral=self.spectral if cfg.weight_decay_norm > 0 else None,
                                       model=self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.loss).backward()
        return loss

    def update(self, loss_is_finite: bool = True) -> tuple[float, bool]:
        """Clip, then apply the gradients unless the step must be skipped: (norm, skipped).

        A skipped step also restores the BatchNorm statistics of its forward pass,
        so that a NaN batch leaves no trace in the model.
        """
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not loss_is_finite:
            norm = math.nan
        skip = self.skipper.should_skip(norm)
        if self.runtime.distributed:  # every rank takes the same decision
            flag = torch.tensor([float(skip)], device=self.runtime.device)
            dist.all_reduce(flag)
            skip = bool(flag.item() > 0)
        if skip:
            torch._foreach_copy_(self._bn_buffers, self._bn_backup)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() / 2)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model, self.step)
        self.step += 1
        return norm, skip

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Single-sample test NELBO (nats, bits/dim) and active units of the EMA model."""
        model = self.eval_model.eval()
        total, count = torch.zeros(3, dtype=torch.float64), 0
        kl_channels: list[torch.Tensor] | None = None  # per group: [L] summed over the data
        for i, x in enumerate(self.test_loader):
            if self.config.eval_batches and i >= self.config.eval_batches:
                break
            x = x.to(self.runtime.device)
            with self.autocast():
                out = model(x)
            recon = -out.likelihood.log_prob(x).double()
            kl = torch.stack([k.double() for k in out.kl], 1).sum(1)
            total += torch.stack([recon.sum(), kl.sum(), (recon + kl).sum()]).cpu()
            count += x.shape[0]
            batch_kl = [k.double().sum(0).cpu() for k in out.kl_per_channel]
            kl_channels = batch_kl if kl_channels is None else [a + b for a, b in zip(kl_channels, batch_kl)]
        recon, kl, nelbo = (total / count).tolist()
        units = objectives.active_units([(k / count)[None] for k in kl_channels]) if kl_channels else []
        return {"test_nelbo": nelbo, "test_recon": recon, "test_kl": kl,
                "test_bpd": objectives.bits_per_dim(nelbo, self.model.data_dims),
                "test_kl_groups": [float(k.sum()) / count for k in kl_channels],
                "active_units": [int(u) for u in units], "active_units_total": int(sum(units))}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model": self.model.state_dict(),
                "ema": self.ema.model.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step, "total_steps": self.total_steps,
                              "warmup_steps": self.warmup_steps},
                "scaler": self.scaler.state_dict(), "spectral": self.spectral.state_dict(),
                "grad_skip": self.skipper.state_dict(), "rng": rng_state(),
                "step": self.step, "epoch": self.epoch,
                "data_position": {"epoch": self.epoch, "batch": self.batch_in_epoch},
                "best": self.best}

    def save(self, name: str = "checkpoint.pt") -> None:
        if self.runtime.is_main:
            save_checkpoint(self.run_dir / name, self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        state = load_checkpoint(path, map_location=self.runtime.device)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.model.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.spectral.load_state_dict(state["spectral"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this config: "
                                  + describe_mismatch(self.model, state["model"], state["config"],
                                                      self.config, error=err)) from err
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipper.load_state_dict(state["grad_skip"])
        self.step, self.best = int(state["step"]), float(state["best"])
        self.epoch = int(state["data_position"]["epoch"])
        self.batch_in_epoch = int(state["data_position"]["batch"])
        if self.runtime.rank == 0 or not self.runtime.distributed:
            set_rng_state(state["rng"])
        else:  # other ranks: a different but reproducible stream
            seed_everything(self.config.seed + self.runtime.rank + 1000 * self.step)

    # ---------------------------------------------------------------- logging
    def log(self, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.runtime.is_main:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in metrics.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{prefix}/{key}/group_{i:02d}", v, self.step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, self.step)
            elif isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), self.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"split": prefix, "step": self.step, "epoch": self.epoch,
                                "time": time.time(), **metrics}) + "\n")

    @torch.no_grad()
    def save_images(self, temperatures=(0.6, 0.8, 1.0), num: int = 64) -> None:
        """Sample grids at several temperatures and input/reconstruction pairs, as PNG."""
        if not self.runtime.is_main:
            return
        from torchvision.utils import make_grid, save_image
        model = self.eval_model.eval()
        nrow = int(math.sqrt(num))
        for t in temperatures:
            images = model.sample(num, t=t).float().cpu()
            save_image(images, self.run_dir / f"samples_t{t:.1f}.png", nrow=nrow)
            if self.writer is not None:
                self.writer.add_image(f"samples/t{t:.1f}", make_grid(images, nrow=nrow), self.step)
        x = next(iter(self.test_loader))[:num // 2].to(self.runtime.device)
        recon = model(x).likelihood.mean().float()
        pairs = torch.stack([x.float(), recon], 1).flatten(0, 1).cpu()
        save_image(pairs, self.run_dir / "reconstructions.png", nrow=nrow)
        if self.writer is not None:
            self.writer.add_image("reconstructions", make_grid(pairs, nrow=nrow), self.step)

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
        """Train until ``total_steps`` (or ``stop_at_step``, which simulates a pre-emption)."""
        cfg = self.config
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.run_name,
                       dynamic_ncols=True)
        previous = signal.getsignal(signal.SIGTERM)
        if _in_main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupted)
        start, start_step, last = time.time(), self.step, {}
        try:
            while self.step < self.total_steps:
                for x in self.epoch_batches():
                    last = self.train_step(x)
                    self.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(nelbo=f"{last['nelbo']:.2f}", bpd=f"{last['bpd']:.3f}",
                                        kl=f"{last['kl']:.1f}", skip=self.skipper.skipped)
                    if self.step % cfg.log_every == 0:
                        self.log(last)
                    if self.step % cfg.checkpoint_every == 0:
                        self.save()
                    if self.step >= self.total_steps or self.step == stop_at_step:
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if self.epoch % cfg.eval_every == 0 and self.step < self.total_steps:
                        self.end_of_epoch()
                if self.step == stop_at_step:
                    self.save()
                    return {"step": self.step, "stopped": True, **last}
        except (KeyboardInterrupt, Interrupted):
            self.save()
            if self.runtime.is_main:
                print(f"\ninterrupted at step {self.step}: checkpoint saved to "
                      f"{self.run_dir / 'checkpoint.pt'}; continue with --resume", flush=True)
            raise
        finally:
            if bar is not None:
                bar.close()
            if _in_main_thread():
                signal.signal(signal.SIGTERM, previous)
        elapsed = time.time() - start
        summary = self.end_of_epoch(final=True)
        summary.update(steps=self.step, train_seconds=elapsed,
                       images_per_second=(self.step - start_step) * cfg.batch_size
                       * self.runtime.world_size / max(elapsed, 1e-9),
                       skipped_steps=self.skipper.skipped)
        return summary

    def end_of_epoch(self, final: bool = False) -> dict[str, Any]:
        """Validate, keep the best checkpoint, write images; at the end also the IW NLL."""
        metrics = self.evaluate() if self.runtime.is_main else {}
        if self.runtime.is_main:
            self.log(metrics, prefix="test")
            if metrics["test_nelbo"] < self.best:
                self.best = metrics["test_nelbo"]
                self.save("checkpoint_best.pt")
            self.save_images()
        self.save()
        if final:  # every rank evaluates its own shard of the test set; sums are all-reduced
            from hvae.evaluation import iw_log_likelihood
            rt = self.runtime
            loader = (hdata.build_loader(self.config, "test", distributed=True, rank=rt.rank,
                                         world_size=rt.world_size, device=rt.device)
                      if rt.distributed else self.test_loader)
            iw = iw_log_likelihood(self.eval_model, loader, self.config.num_iw_samples,
                                   device=rt.device, progress=self.progress,
                                   max_batches=self.config.eval_batches,
                                   distributed=rt.distributed)
            if rt.is_main:
                metrics.update({f"iw_{k}": v for k, v in iw.items()})
                self.log({k: v for k, v in metrics.items() if k.startswith("iw_")}, prefix="test")
        if self.writer is not None:
            self.writer.flush()
        return metrics


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def train(config: Config, resume: str | os.PathLike | None = None, progress: bool = True,
          stop_at_step: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Train ``config`` (under torchrun when launched so) and return the final metrics."""
    runtime = init_runtime(device)
    trainer = Trainer(config, runtime, resume=resume, progress=progress)
    try:
        return trainer.fit(stop_at_step=stop_at_step)
    finally:
        if trainer.writer is not None:
            trainer.writer.close()
