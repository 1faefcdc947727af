"""The weights of every conv and the scales of every BatchNorm, stacked once per step.

A deep NVAE has hundreds of convs.  Normalising each conv's weight inside its
own forward costs about five small kernels per conv; the spectral and
BatchNorm regularisers then stack the same weights again, and autograd adds
the regulariser's gradient to the forward's gradient parameter by parameter.
Inside ``stacked_weights(model)`` the weights of equal shape and kind are
stacked and (for weight-normalised convs) normalised in one pass per group, a
``Stack``; modules read their row (``module.batched_weight``, a view) and the
regularisers read the whole stack (``shared_stack``), so the two gradients
meet once per group instead of once per parameter.  Same formulas, same values.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from hvae.distributions import is_channels_last
from hvae.model.cells import Conv2d, weight_norm


@dataclass(eq=False)
class Stack:
    """One group's weights, row j belonging to ``members[j]``."""
    tensor: torch.Tensor            # [N, *weight shape]; channels-last conv weights as [N, o, k, k, i]
    members: list[nn.Module]
    channels_last: bool = False

    def matrices(self) -> torch.Tensor | None:
        """Conv weights as [N, C_out, C_in*k*k], a view of the stack; None for
        channels-last groups with C_in and k above 1, whose columns are stored in
        another order (a copy would leave their gradients in a layout the
        parameters do not have)."""
        t = self.tensor
        if self.channels_last:
            if t.shape[2] * t.shape[3] > 1 and t.shape[4] > 1:
                return None
            t = t.permute(0, 1, 4, 2, 3)
        return t.reshape(t.shape[0], t.shape[1], -1)

    def rows(self) -> tuple[torch.Tensor, ...]:
        """Each member's weight with its parameter's shape and strides (``unbind``: one
        autograd node for the whole group)."""
        rows = self.tensor.unbind(0)
        return tuple(w.permute(0, 3, 1, 2) for w in rows) if self.channels_last else rows


def _memory_order(w: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """[o, i, k, k] -> a view in memory order ([o, k, k, i] for channels-last weights)."""
    return w.permute(0, 2, 3, 1) if channels_last else w


def _conv_stack(members: list[Conv2d], cl: bool) -> Stack:
    """The normalised weights of convs of one shape and kind: w = exp(g) * v / (||v|| + 1e-5)."""
    v = torch.stack([_memory_order(c.weight, cl) for c in members])
    if members[0].weight_mask() is not None:
        v = v * torch.stack([_memory_order(c.weight_mask(), cl) for c in members])
    if members[0].log_weight_norm is not None:
        g = torch.stack([_memory_order(c.log_weight_norm, cl) for c in members])
        v = weight_norm(v, g, dims=(2, 3, 4))
    return Stack(v, members, cl)


def _groups(modules, key) -> list[list[nn.Module]]:
    groups: dict = {}
    for m in modules:
        groups.setdefault(key(m), []).append(m)
    return list(groups.values())


def _conv_key(c: Conv2d) -> tuple:
    w = c.weight
    return (tuple(w.shape), w.dtype, w.device, is_channels_last(w),
            c.weight_mask() is not None, c.log_weight_norm is not None)


def _stacks(convs: list[Conv2d], norms: list[_BatchNorm]) -> list[Stack]:
    stacks = [_conv_stack(group, is_channels_last(group[0].weight)) for group in _groups(convs, _conv_key)]
    stacks += [Stack(torch.stack([bn.weight for bn in group]), group)
               for group in _groups(norms, lambda bn: (bn.weight.numel(), bn.weight.dtype, bn.weight.device))]
    return stacks


@contextlib.contextmanager
def stacked_weights(model: nn.Module) -> Iterator[None]:
    """Within the block every ``hvae`` conv of ``model`` uses its row of the step's
    stacked (normalised) weights and every affine BatchNorm exposes its row as
    ``batched_weight`` (read by ``cells.bn_act_conv``).  Nested blocks reuse the
    outer one's stacks; they are dropped when the block ends (autograd keeps
    what backward needs).
    """
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    norms = [m for m in model.modules()
             if isinstance(m, _BatchNorm) and m.weight is not None and m.weight.numel()]
    modules = convs + norms
    if not modules or getattr(modules[0], "weight_stack", None) is not None:
        yield
        return
    try:
        for stack in _stacks(convs, norms):
            for m, row in zip(stack.members, stack.rows()):
                m.batched_weight, m.weight_stack = row, stack
        for bn in norms:
            bn.pending_batches = 0  # cells.count_batch
        yield
    finally:
        for m in modules:
            vars(m).pop("batched_weight", None)
            vars(m).pop("weight_stack", None)
        _count_batches(norms)


def _count_batches(norms: list[_BatchNorm]) -> None:
    """Add the batches counted while stacked to ``num_batches_tracked``, one op per count."""
    by_count: dict[tuple, list[torch.Tensor]] = {}
    for bn in norms:
        n = vars(bn).pop("pending_batches", 0)
        if n and bn.num_batches_tracked is not None:
            t = bn.num_batches_tracked
            by_count.setdefault((n, t.device), []).append(t)
    for (n, _), counters in by_count.items():
        torch._foreach_add_(counters, n)


def shared_stack(modules: Sequence[nn.Module]) -> Stack | None:
    """The current stack whose rows are exactly ``modules``' weights, in this order, if any."""
    stack = getattr(modules[0], "weight_stack", None) if modules else None
    return stack if stack is not None and stack.members == list(modules) else None
