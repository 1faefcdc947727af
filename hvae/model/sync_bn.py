"""BatchNorm with the statistics of every rank's batch, and no host read (``--sync_bn``).

PyTorch's ``nn.SyncBatchNorm`` reads every layer's per-rank counts back to the host,
to drop ranks whose batch is empty: outside a CUDA-graph capture that is one host
sync per BatchNorm layer per step (cifar10 has 364 layers).  It also does not
run on the CPU.  In training every rank's batch has the same, non-zero size (the
loader drops the last partial batch), so one all-reduce per layer of the
per-channel sums suffices::

    d = x - K,    mean = K + S1 / n,    var = S2 / n - (S1 / n)^2

with S1 and S2 the sums of d and d^2 over every rank's batch, n their count, and K the
layer's running mean (the same on every rank: DDP broadcasts buffers), which keeps
the subtraction free of cancellation.  The all-reduce is differentiable (its
backward all-reduces the gradient, ``AllReduceSum``), so autograd gives the whole
batch's gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
import torch.nn as nn

from hvae.model.cells import count_batch


class AllReduceSum(torch.autograd.Function):
    """The sum of ``x`` over the ranks of ``group``; its gradient, the sum of the ranks'
    gradients.  Written out: torch's functional all-reduce has a gradient of its own only
    from torch 2.11, and 2.10 drops it without a word."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return collectives.wait_tensor(collectives.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = collectives.all_reduce(grad.contiguous(), "sum", ctx.group)
        return collectives.wait_tensor(summed), None


@torch.compiler.disable
def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``AllReduceSum`` run eagerly, also inside a region that ``--compile`` compiles:
    traced, the all-reduce lost its backward and the input gradients came out wrong
    (tests/test_sync_bn.py).  It costs one graph break per BatchNorm layer, and only
    with ``--sync_bn`` under torchrun."""
    return AllReduceSum.apply(x, group)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span every rank of ``process_group``.

    Synchronises only in training steps (training mode with gradients on); elsewhere,
    e.g. evaluation's BatchNorm re-adjustment under ``no_grad``, it is a plain
    BatchNorm of this rank's batch.  Same parameters and buffers as
    ``nn.BatchNorm2d``: checkpoints move freely between the two.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def synchronised(self) -> bool:
        return (self.training and torch.is_grad_enabled() and self.track_running_stats
                and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.synchronised():
            return super().forward(x)
        self._check_input_dim(x)
        c, shape = x.shape[1], (1, -1, 1, 1)
        shift = self.running_mean.detach().clone().float()
        d = x.float() - shift.view(shape)
        count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
        group = self.process_group or dist.group.WORLD
        sums = all_reduce_sum(
            torch.cat([d.sum((0, 2, 3)), d.square().sum((0, 2, 3)), count]), group)
        n = sums[2 * c]
        offset = sums[:c] / n
        var = (sums[c:2 * c] / n - offset.square()).clamp_min(0)
        y = (d - offset.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:  # the step's stacked gamma when there is one (hvae.model.bank)
            weight = getattr(self, "batched_weight", None)
            weight = self.weight if weight is None else weight
            y = y * weight.float().view(shape) + self.bias.float().view(shape)
        with torch.no_grad():
            count_batch(self)
            momentum = self.momentum if self.momentum is not None else 1.0 / (
                self.num_batches_tracked.float() + getattr(self, "pending_batches", 0))
            self.running_mean.lerp_(shift + offset, momentum)
            self.running_var.lerp_(var * (n / (n - 1).clamp_min(1)), momentum)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` replaced by a ``SyncBatchNorm2d`` that
    shares its parameters and buffers (the model's other layers are left as they are)."""
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group=process_group)
        sync.weight, sync.bias = module.weight, module.bias
        for name, buffer in module.named_buffers(recurse=False):
            setattr(sync, name, buffer)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
