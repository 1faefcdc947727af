"""Activation checkpointing (``Config.activation_checkpointing``): recompute in backward.

Each outermost residual cell (encoder, pre- and post-processing) and each latent
group (its decoder cells, prior, posterior, flows and combiner) runs under
non-reentrant ``torch.utils.checkpoint``: forward keeps only the region's
inputs, and backward runs the region again to rebuild what its own backward
needs.  The recomputation repeats the forward exactly, so losses and gradients
are bit-identical to a run without it (fp32, deterministic kernels):

- the RNG state is restored before recomputing (the posterior noise),
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

from hvae.model import cells
from hvae.model.cells import Conv2d


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
            region.forward = types.MethodType(_checkpointed_forward, region)
    return model


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return self._inner_forward(*args, **kwargs)
    rows = [vars(m).get("batched_weight") for m in self._weighted]
    return checkpoint(self._inner_forward, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (contextlib.nullcontext(), _recomputing(self._weighted, rows)),
                      **kwargs)


@contextlib.contextmanager
def _recomputing(modules: list[nn.Module], rows: list) -> Iterator[None]:
    """The forward's view of the world, for the recomputation in backward."""
    saved = [vars(m).get("batched_weight") for m in modules]
    for m, row in zip(modules, rows):
        if row is not None:
            m.batched_weight = row
    cells.RECOMPUTING = True
    try:
        yield
    finally:
        cells.RECOMPUTING = False
        for m, row in zip(modules, saved):
            if row is None:
                vars(m).pop("batched_weight", None)
            else:
                m.batched_weight = row
