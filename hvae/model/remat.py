"""Activation checkpointing (``Config.activation_checkpointing``): recompute in backward.

Each outermost residual cell (encoder, pre- and post-processing) and each latent
group (its decoder cells, prior, posterior, flows and combiner) runs under
non-reentrant ``torch.utils.checkpoint``: forward keeps only the region's
inputs, and backward runs the region again to rebuild what its own backward
needs.  The recomputation repeats the forward exactly, so losses and gradients
are bit-identical to a run without it (fp32, deterministic kernels):

- the posterior noise is not drawn again: each latent group's ``NoiseTape`` keeps
  what forward drew and hands it back to the recomputation.  No RNG state is saved
  or restored (torch's way reads the generator's state on the host, which a
  CUDA-graph capture cannot hold), so checkpointed steps are captured too;
- autocast is re-entered as it was (checkpoint's own bookkeeping),
- each conv and BatchNorm reads the same row of the step's stacked weights
  (``hvae.model.bank``) it read in forward: the stack is gone by backward, so the
  rows are kept and put back for the recomputation,
- BatchNorm uses the batch statistics again without updating its running
  statistics or batch count a second time (``cells.RECOMPUTING``).

Regions compiled by ``--compile regional`` are checkpointed around the compiled
call; inside ``--compile full`` the compiler's partitioner decides what to
recompute and the wrappers step aside.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from hvae.distributions import standard_normal_like
from hvae.model import cells
from hvae.model.cells import Conv2d


class NoiseTape:
    """A latent group's posterior noise under activation checkpointing: drawn and kept in
    forward, handed back in the recomputation (``LatentGroup.noise_tape``)."""

    def __init__(self):
        self.recording: list | None = None   # forward appends its draws here
        self.replaying: Iterator | None = None  # the recomputation takes them back in order

    @torch.compiler.disable  # the draw stays outside compiled regions, where it is kept
    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.replaying is not None:
            eps = next(self.replaying, None)
            if eps is None:
                raise RuntimeError("a recomputed region drew more noise than its forward")
            return eps
        eps = standard_normal_like(like)
        if self.recording is not None:
            self.recording.append(eps)
        return eps

    @contextlib.contextmanager
    def record(self, draws: list) -> Iterator[None]:
        self.recording = draws
        try:
            yield
        finally:
            self.recording = None

    @contextlib.contextmanager
    def replay(self, draws: list) -> Iterator[None]:
        self.replaying = iter(draws)
        try:
            yield
        finally:
            self.replaying = None


def enable_activation_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Wrap the forward of every region of ``model`` (``compile.regions``) in place.

    Call after ``compile_model`` (the wrapper calls whatever ``forward`` the module
    has, compiled or not) and after the EMA copy (evaluation needs none of it)."""
    if not enabled:
        return model
    from hvae.model.compile import regions
    for region in regions(model):
        if getattr(region, "_inner_forward", None) is None:
            region._inner_forward = region.forward
            region._weighted = [m for m in region.modules() if isinstance(m, (Conv2d, _BatchNorm))]
            if hasattr(region, "noise_tape"):  # a region that samples (a latent group)
                region.noise_tape = NoiseTape()
            region.forward = types.MethodType(_checkpointed_forward, region)
    return model


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return self._inner_forward(*args, **kwargs)
    rows = [vars(m).get("batched_weight") for m in self._weighted]
    tape, draws = getattr(self, "noise_tape", None), []

    def contexts():
        if tape is None:
            return contextlib.nullcontext(), _recomputing(self._weighted, rows)
        return tape.record(draws), _recomputing(self._weighted, rows, tape.replay(draws))

    return checkpoint(self._inner_forward, *args, use_reentrant=False, preserve_rng_state=False,
                      context_fn=contexts, **kwargs)


@contextlib.contextmanager
def _recomputing(modules: list[nn.Module], rows: list, noise=contextlib.nullcontext()
                 ) -> Iterator[None]:
    """The forward's view of the world, for the recomputation in backward: its stacked
    weight rows, no BatchNorm statistics update, and (``noise``) its posterior noise."""
    saved = [vars(m).get("batched_weight") for m in modules]
    for m, row in zip(modules, rows):
        if row is not None:
            m.batched_weight = row
    cells.RECOMPUTING = True
    try:
        with noise:
            yield
    finally:
        cells.RECOMPUTING = False
        for m, row in zip(modules, saved):
            if row is None:
                vars(m).pop("batched_weight", None)
            else:
                m.batched_weight = row
