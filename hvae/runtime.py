"""Where and how this process runs: rank and device under torchrun, seeds, RNG states.

The one place that starts the process group (train.py and evaluate.py both
call ``init_runtime``): NCCL on CUDA, gloo on CPU, torchrun's environment, no
fixed ports.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Runtime:
    """Where this process runs: rank and world size under torchrun, and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False  # init_runtime created it, so runtime_session ends it

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
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return Runtime(rank, world_size, local_rank, dev, owns_process_group=owns)


@contextlib.contextmanager
def runtime_session(device: str | None = None) -> Iterator[Runtime]:
    """``init_runtime`` for the block, then end the process group it started.  Left to
    the interpreter's exit, the group's communication threads can be torn down
    mid-flight and abort a finished run ("terminate called without an active
    exception")."""
    runtime = init_runtime(device)
    try:
        yield runtime
    finally:
        if runtime.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Deterministic algorithms when asked for.  Otherwise, on CUDA, cuDNN autotuning:
    training batches all have one shape (the loader drops the last, partial one), so
    each convolution is timed once and its fastest algorithm kept."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def autocast(device: torch.device, amp: str, cache_enabled: bool = True):
    """The autocast context of ``--amp`` (none, fp16, bf16, auto) on ``device``.

    ``cache_enabled=False`` re-casts the weights at every use instead of caching
    the casts for the context's lifetime: what a CUDA-graph capture needs."""
    amp = resolve_amp(amp, device)[0]
    if amp not in AMP_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache_enabled)


# ---------------------------------------------------------------- the fast path
def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """``--amp`` for ``device``: (none / fp16 / bf16, why).  "auto" is bf16 on a GPU that
    computes in bf16 (Ampere and later), fp16 with loss scaling on older GPUs, and fp32
    elsewhere (CPU autocast is slower than fp32 for this model's convolutions)."""
    if amp != "auto":
        return amp, "as set"
    if device.type != "cuda":
        return "none", f"fp32 on {device.type}"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", "the GPU computes in bf16"
    return "fp16", "the GPU has no bf16: fp16 with loss scaling"


def resolve_compile(mode: str, device: torch.device) -> tuple[str, str]:
    """``--compile`` for ``device``: "auto" is regional on CUDA (inductor's Triton kernels;
    a one-time compile, cached on disk), none elsewhere."""
    if mode != "auto":
        return mode, "as set"
    if device.type != "cuda":
        return "none", f"eager on {device.type}"
    from torch.utils._triton import has_triton
    if not has_triton():
        return "none", "Triton is not installed, so inductor cannot compile for this GPU"
    return "regional", "each kind of cell compiled once (a one-time compile, cached on disk)"


def resolve_cuda_graphs(mode: str, device: torch.device) -> tuple[str, str]:
    """``--cuda_graphs`` for ``device``: "auto" captures the step on CUDA."""
    if mode != "auto":
        return mode, "as set"
    if device.type != "cuda":
        return "false", f"no CUDA graphs on {device.type}"
    return "true", "the step is captured once and replayed"


def choose_fast_path(config, device: torch.device):
    """``config`` with ``amp``, ``compile`` and ``cuda_graphs`` resolved for ``device``
    (what "auto" means there), and one line that says what was chosen and why."""
    chosen = {"amp": resolve_amp(config.amp, device),
              "compile": resolve_compile(config.compile, device),
              "cuda_graphs": resolve_cuda_graphs(config.cuda_graphs, device)}
    line = f"{device.type}: " + "; ".join(
        f"--{name} {getattr(config, name)}" + (f" -> {value} ({why})" if why != "as set" else "")
        for name, (value, why) in chosen.items())
    return config.replace(**{name: value for name, (value, _) in chosen.items()}), line


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block, and what it was after it."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


# ---------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state of the process, as plain tensors and numbers (for checkpoints)."""
    version, keys, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(keys), "python_version": version,
             "python_gauss": gauss, "numpy": _numpy_state()}
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


# ---------------------------------------------------------------- stopping
class Interrupted(Exception):
    """A stop asked for by a signal, raised at a safe point after the state is saved."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While active, SIGTERM and SIGINT raise ``Interrupted`` at once: the block's
    cleanup (e.g. the run folder's lock) runs however the process is stopped.  For
    where nothing needs saving yet; ``StopSignals`` takes over inside the loop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, _frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in StopSignals.SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignals:
    """While active, SIGTERM and SIGINT only set a flag (``requested``); the loop
    checks it at step boundaries, so a signal never lands inside a step or a
    checkpoint write.  A second signal is only reported.  Outside the main
    thread (where handlers cannot be installed) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, verbose: bool = True):
        self.signum: int | None = None
        self.verbose = verbose
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop was asked for (call where stopping is safe)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum, _frame) -> None:
        if self.verbose:
            what = "already stopping" if self.signum is not None else \
                "stopping after the current step (the checkpoint is saved first)"
            print(f"\n{signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
