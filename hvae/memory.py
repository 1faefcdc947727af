"""GPU memory of a training step, predicted on any machine (no GPU needed).

The step's forward and loss run on fake CUDA tensors (``FakeTensorMode``: a
shape, a dtype and a device, no data), so the CPU runs what a GPU would run,
autocast follows the GPU's rules, and every tensor the step makes is counted
without doing the arithmetic: celebahq256 at batch 4 takes seconds.
``resident_at_backward(config)`` is what a GPU holds when backward starts
(weights, EMA, Adamax state, buffers, and every tensor still alive: activations
kept for backward, the stacked weights, the batch).  ``scripts/bench.py
--memory-only`` prints it.  The tests also run the sync-free step on fake CUDA
tensors, to see that it keeps every tensor on the GPU and reads nothing back.

Autograd's backward cannot run on fake CUDA tensors (it needs a real CUDA
context).  A deep copy of fake tensors (the EMA's) needs ``FakeCopyMode(mode)``
to stay in the same fake mode.  Fake CUDA tensors need torch 2.10 or later (hvae's floor):
before, a random op on one starts the real CUDA runtime, which fails without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from hvae import step as step_module
from hvae.runtime import AMP_DTYPES, Runtime, patched


@contextlib.contextmanager
def cuda_autocast(device, amp: str, cache_enabled: bool = True) -> Iterator[None]:
    """``hvae.runtime.autocast`` for fake CUDA tensors: ``torch.autocast("cuda")`` turns
    itself off without a GPU, so this sets CUDA's autocast state directly."""
    if amp not in AMP_DTYPES:
        yield
        return
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", AMP_DTYPES[amp])
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Inside, new tensors are fake (moved to ``cuda`` they are fake CUDA tensors) and the
    training step autocasts as on a GPU.  The default device stays the CPU, so that a
    tensor made without ``device=`` lands there, as it would in a run, and an op that
    mixes it with CUDA tensors fails."""
    mode = FakeTensorMode()
    with mode, patched(step_module, "autocast", cuda_autocast):
        yield mode


def grad_scaler(enabled: bool) -> torch.amp.GradScaler:
    """A CUDA ``GradScaler`` that stays enabled without a GPU."""
    with patched(torch.cuda, "is_available", lambda: True):
        return torch.amp.GradScaler("cuda", enabled=enabled)


class _LiveStorages(TorchDispatchMode):
    """Remembers (weakly) the storage of every tensor an op returns; ``live_bytes`` sums
    those still alive (views share their base's storage, counted once)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref, self.storages = StorageWeakRef, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage._cdata, (self._ref(storage), storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


class _BackwardStarts(Exception):
    """Raised in place of ``backward``: the measurement ends where backward would start."""


def resident_at_backward(config) -> dict:
    """GiB a CUDA device holds when the training step's backward starts: one real
    ``TrainStep.forward_backward`` on fake CUDA tensors.  ``amp="auto"`` is taken as
    bf16 (a GPU without bf16 runs fp16: pass it)."""
    from hvae import objectives
    from hvae.model import NVAE
    from hvae.model.remat import enable_activation_checkpointing
    from hvae.schedules import Schedule

    def stop(*args, **kwargs):
        measured["live"] = tracker.live_bytes()
        raise _BackwardStarts

    # channels-last changes layouts, not sizes (and converting fake parameters fails)
    cfg = config.replace(channels_last=False, amp="bf16" if config.amp == "auto" else config.amp)
    device, measured = torch.device("cuda"), {}
    with fake_cuda(), torch.device(device), patched(torch.Tensor, "backward", stop):
        model = NVAE(cfg)
        enable_activation_checkpointing(model, cfg.activation_checkpointing)
        spectral = objectives.SpectralRegularizer(model, cfg.num_power_iter)
        spectral._initialized_on_host = True  # a later step's (its flag is a host read)
        optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate)
        schedule = Schedule(cfg, total_steps=10**9, lr_warmup_steps=0)  # KL balancing on
        parts = step_module.StepParts(
            model, model, schedule, optimizer, spectral, None,
            step_module.GradSkipper(cfg.grad_skip_factor, device=device),
            torch.amp.GradScaler("cuda", enabled=False))
        step = step_module.TrainStep(parts, cfg, Runtime(device=device))
        x = torch.zeros(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size,
                        device=device)
        with (tracker := _LiveStorages()):
            try:
                step.forward_backward(x, 0)
            except _BackwardStarts:
                pass
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params, buffers = nbytes(model.parameters()), nbytes(model.buffers()) + nbytes(spectral.buffers())
    parts = {"weights": params + buffers,
             "ema": (params + buffers) if cfg.ema_decay > 0 else 0,
             "optimizer": 2 * params,        # Adamax: exp_avg and exp_inf
             "activations": measured["live"]}  # everything the step made that is still alive
    gib = {k: round(v / 2**30, 3) for k, v in parts.items()}
    return {"resident_at_backward_gib": round(sum(parts.values()) / 2**30, 3),
            "resident_parts_gib": gib, "resident_parts_bytes": parts}
