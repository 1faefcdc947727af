"""Parts of a training step on fake CUDA tensors, on a machine without a GPU.

A fake tensor has a shape, a dtype and a device but no data (``FakeTensorMode``),
so the CPU can run what a GPU would run and see what a GPU would hold.
``scripts/bench.py`` measures the memory a GPU holds when backward starts, and
the tests check that the sync-free step keeps every tensor on the GPU and reads
nothing back (a fake tensor has no value to read).  Autograd's backward cannot
run on fake CUDA tensors: it needs a real CUDA context.  A deep copy of fake
tensors (the EMA's) needs ``FakeCopyMode(mode)`` to stay in the same fake mode.
"""
from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hvae import step as step_module
from hvae.runtime import AMP_DTYPES


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
    """Inside, new tensors are fake (moved to ``cuda`` they are fake CUDA tensors), the
    training step autocasts as on a GPU, and activation checkpointing skips saving the
    CUDA RNG state (none exists).  The default device stays the CPU, so that a tensor
    made without ``device=`` lands there, as it would in a run, and an op that mixes it
    with CUDA tensors fails."""
    mode = FakeTensorMode()
    with mode, mock.patch.object(step_module, "autocast", cuda_autocast), \
            mock.patch("torch.utils.checkpoint.get_device_states", lambda *a: ([], [])):
        yield mode


def grad_scaler(enabled: bool) -> torch.amp.GradScaler:
    """A CUDA ``GradScaler`` that stays enabled without a GPU."""
    with mock.patch("torch.cuda.is_available", lambda: True):
        return torch.amp.GradScaler("cuda", enabled=enabled)
