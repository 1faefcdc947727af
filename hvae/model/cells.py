"""Building blocks of the NVAE tower: weight-normalised convs, SE, residual cells.

Encoder cells are BN-Swish-Conv3x3 twice; decoder (and post-processing) cells
are inverted-residual "mbconv" blocks with a depthwise 5x5 conv.  Every cell
returns ``skip + 0.1 * branch``: the small branch scale keeps the deep tower
close to identity early in training (NVAE, Sec. 3.2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.05
BN_EPS = 1e-5
BRANCH_SCALE = 0.1

# True while activation checkpointing recomputes a region in backward
# (``hvae.model.remat``): BatchNorm then uses the batch statistics without
# updating its running statistics and batch count a second time.
RECOMPUTING = False


class Conv2d(nn.Conv2d):
    """nn.Conv2d with weight normalisation: w = exp(log_weight_norm) * v / ||v||.

    The per-output-channel ``log_weight_norm`` starts at log ||v|| so the
    initial weight is unchanged.  ``weight_norm=False`` (convs followed by BN,
    where a norm would be redundant) keeps the plain weight.  The normalised
    weight is computed per call (no parametrizations), or, inside
    ``hvae.model.bank.stacked_weights(model)``, once for all the model's convs.
    """

    batched_weight: torch.Tensor | None = None  # set by hvae.model.bank.stacked_weights

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, groups: int = 1, bias: bool = True,
                 weight_norm: bool = True, init_scale: float = 1.0):
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias)
        if weight_norm:
            with torch.no_grad():
                self.weight.mul_(init_scale)
                norm = self._norm(self.masked_weight()).clamp_min(1e-3)
            self.log_weight_norm = nn.Parameter(norm.log())
        else:
            self.register_parameter("log_weight_norm", None)

    @staticmethod
    def _norm(w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)

    def weight_mask(self) -> torch.Tensor | None:
        """The 0/1 mask applied to the raw weight (masked convs override this)."""
        return None

    def masked_weight(self) -> torch.Tensor:
        """The raw weight, times the mask of masked convs."""
        mask = self.weight_mask()
        return self.weight if mask is None else self.weight * mask

    def normalized_weight(self) -> torch.Tensor:
        """The weight actually used by the convolution."""
        if self.batched_weight is not None:
            return self.batched_weight
        v = self.masked_weight()
        if self.log_weight_norm is None:
            return v
        return weight_norm(v, self.log_weight_norm, dims=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


def weight_norm(v: torch.Tensor, log_g: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """w = exp(log_g) * v / (||v|| + 1e-5), the norm over ``dims`` (one per output channel).

    Keeps only w (and the small norms) for backward, not v as well: for a deep
    model these are two more copies of every conv weight (1.2 GiB for celebahq256)."""
    return _WeightNorm.apply(v, log_g, dims)


class _WeightNorm(torch.autograd.Function):
    """Backward from the output: with s = exp(g) / (n + eps), n = ||v||, w = s v,
    dL/dg = <dL/dw, w> and dL/dv = s dL/dw - <dL/dw, w> w / (exp(g) n)."""

    @staticmethod
    def forward(ctx, v, log_g, dims):
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        w = v * (log_g.exp() / (norm + 1e-5))
        ctx.dims = dims
        ctx.save_for_backward(w, log_g, norm)
        return w

    @staticmethod
    def backward(ctx, grad_w):
        w, log_g, norm = ctx.saved_tensors
        g = log_g.exp()
        dot = (grad_w * w).sum(dim=ctx.dims, keepdim=True)
        grad_v = grad_w * (g / (norm + 1e-5)) - w * (dot / (g * norm.clamp_min(1e-30)))
        return grad_v, dot, None


def elu(x: torch.Tensor) -> torch.Tensor:
    """F.elu: one kernel forward and one backward (an exp-based autograd Function
    took four and three, and is ~4x slower than F.elu on the CPU with torch 2.14)."""
    return F.elu(x)


class ELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu(x)


def batch_norm(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


# Devices on which bn_act_conv keeps the BN output and the activation for backward
# instead of recomputing them (see _BNActConv).
KEEP_BN_ACT_ON = frozenset({"cpu"})


class _BNActConv(torch.autograd.Function):
    """conv(up(silu(bn(x)))) in training mode, keeping only x (and the batch
    statistics) for the backward pass.

    On accelerators, where memory bounds the batch, the BN output and the
    activation are recomputed in backward (two cheap elementwise passes next to
    the conv), so of the three activation-sized tensors autograd would keep, one
    is stored.  On the CPU, where a step is bound by arithmetic and memory is
    plentiful, both are kept instead (the recomputation is ~5% of a demo step).
    Runs with autocast off and casts explicitly to the dtype autocast would have
    used for the conv.
    """

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, weight, bias, bn, conv, act, up):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        stats = (None, None) if RECOMPUTING else (bn.running_mean, bn.running_var)
        with torch.autocast(device, enabled=False):
            bn_out, mean, invstd = torch.ops.aten.native_batch_norm(  # updates the running stats
                x, bn_weight, bn_bias, *stats, True, bn.momentum, bn.eps)
            h = _act_up(bn_out, act, up).to(dtype)
            y = F.conv2d(h, weight.to(dtype), None if bias is None else bias.to(dtype),
                         conv.stride, conv.padding, conv.dilation, conv.groups)
        if not RECOMPUTING:
            count_batch(bn)
        ctx.conf = (bn.eps, act, up, dtype, conv.stride, conv.padding, conv.dilation, conv.groups)
        kept = (h, bn_out) if x.device.type in KEEP_BN_ACT_ON else ()
        ctx.save_for_backward(x, bn_weight, bn_bias, weight, bias, mean, invstd, *kept)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, bn_weight, bn_bias, weight, bias, mean, invstd, *kept = ctx.saved_tensors
        eps, act, up, dtype, stride, padding, dilation, groups = ctx.conf
        if kept:
            h, bn_out = kept
        else:
            shape = (1, -1, 1, 1)
            scale = (invstd * bn_weight).view(shape)
            shift = torch.addcmul(bn_bias.view(shape), mean.view(shape), scale, value=-1.0)
            bn_out = torch.addcmul(shift, x, scale).to(x.dtype)
            h = _act_up(bn_out, act, up).to(dtype)
        grad_h, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y, h, weight.to(dtype), None if bias is None else [bias.shape[0]],
            stride, padding, dilation, False, [0, 0], groups, [True, True, bias is not None])
        del h
        grad_h = grad_h.to(x.dtype)
        if up:  # adjoint of nearest x2: sum over each 2x2 block
            grad_h = F.avg_pool2d(grad_h, 2) * 4.0
        if act:
            grad_h = torch.ops.aten.silu_backward(grad_h, bn_out)
        grad_x, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward(
            grad_h, x, bn_weight, None, None, mean, invstd, True, eps, [True, True, True])
        return (grad_x, grad_bn_w, grad_bn_b, grad_w.to(weight.dtype),
                None if bias is None else grad_b.to(bias.dtype), None, None, None, None)


def _act_up(h: torch.Tensor, act: bool, up: bool) -> torch.Tensor:
    if act:
        h = F.silu(h)
    if up:  # nearest up-sampling commutes with the per-channel BN before it
        h = F.interpolate(h, scale_factor=2, mode="nearest")
    return h


def bn_act_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: "Conv2d", act: bool = True,
                up: bool = False) -> torch.Tensor:
    """conv(up(silu(bn(x)))) (silu if ``act``, nearest x2 if ``up``); memory-light in training.

    Compiled regions take the plain path: the compiler's partitioner decides
    itself what to recompute in backward."""
    if (bn.training and torch.is_grad_enabled() and type(bn) is nn.BatchNorm2d and bn.affine
            and not torch.compiler.is_compiling()):
        bn_weight = getattr(bn, "batched_weight", None)  # a view of the step's stacked gammas
        return _BNActConv.apply(x, bn.weight if bn_weight is None else bn_weight, bn.bias,
                                conv.normalized_weight(), conv.bias, bn, conv, act, up)
    # eval, no-grad, or a replaced BN (e.g. SyncBatchNorm): the plain path
    return conv(_act_up(bn_forward(x, bn), act, up))


def count_batch(bn: nn.BatchNorm2d) -> None:
    """``bn.num_batches_tracked += 1`` (a training-mode pass), deferred to one batched
    add for all layers while the step's weights are stacked (``hvae.model.bank``)."""
    if torch.compiler.is_compiling():  # in a compiled region the add fuses with its neighbours
        bn.num_batches_tracked.add_(1)
        return
    pending = getattr(bn, "pending_batches", None)
    if pending is None:
        bn.num_batches_tracked.add_(1)
    else:
        bn.pending_batches = pending + 1


def bn_forward(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(x)``; when training with the step's stacked gammas, reads its row
    (``batched_weight``) so that its gradient joins the stack's."""
    weight = getattr(bn, "batched_weight", None)
    if RECOMPUTING and bn.training and type(bn) is nn.BatchNorm2d:
        # throw-away copies of the running statistics: autograd saves the same tensors
        return F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(),
                            bn.weight if weight is None else weight, bn.bias, True, bn.momentum,
                            bn.eps)
    if (weight is None or not (bn.training and torch.is_grad_enabled()) or type(bn) is not nn.BatchNorm2d
            or bn.momentum is None or not bn.track_running_stats
            or bn._forward_hooks or bn._forward_pre_hooks):
        return bn(x)  # the module call: hooks (e.g. evaluation.readjust_bn) and cumulative averages
    count_batch(bn)  # what nn.BatchNorm2d.forward does in training with a fixed momentum
    return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bn.bias, True, bn.momentum, bn.eps)


class SE(nn.Module):
    """Squeeze-excitation: per-channel gates from the global average (cheap global context)."""

    def __init__(self, c: int):
        super().__init__()
        hidden = max(c // 16, 4)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None].to(x.dtype)


class FactorizedReduce(nn.Module):
    """Stride-2 skip: Swish, then four 1x1 convs on the four pixel phases, concatenated.

    The phases (even/odd rows x even/odd columns) are what four shifted
    stride-2 1x1 convs see; with equal splits they run as one grouped conv.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.grouped = c_out % 4 == 0
        if self.grouped:
            self.conv = Conv2d(4 * c_in, c_out, 1, groups=4)
        else:
            sizes = [c_out // 4] * 3 + [c_out - 3 * (c_out // 4)]
            self.convs = nn.ModuleList(Conv2d(c_in, s, 1) for s in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        phases = [x[:, :, ::2, ::2], x[:, :, 1::2, 1::2], x[:, :, ::2, 1::2], x[:, :, 1::2, ::2]]
        if self.grouped:
            return self.conv(torch.cat(phases, dim=1))
        return torch.cat([conv(p) for conv, p in zip(self.convs, phases)], dim=1)


class UpSkip(nn.Module):
    """Up-sampling skip: bilinear x2 and a 1x1 conv (run before the up-sampling:
    both are linear and the conv is bias-free, so they commute and it is 4x cheaper).

    ``align_corners=True`` is NVAE's interpolation (so its checkpoints compute the
    same function here); it maps the corner pixels onto each other."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            return upsample2x_bilinear_by_matmul(x)  # CUDA's bilinear backward uses atomics
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def _bilinear_matrix(n: int, like: torch.Tensor) -> torch.Tensor:
    """[2n, n]: row o mixes the two inputs around o (n - 1) / (2n - 1) (align_corners).
    Elementwise ops only: nothing a CUDA-graph capture or deterministic mode refuses."""
    pos = torch.arange(2 * n, device=like.device, dtype=torch.float64) * (n - 1) / max(2 * n - 1, 1)
    low = pos.floor().clamp_max(n - 1)
    frac = (pos - low)[:, None]
    high = (low + 1).clamp_max(n - 1)
    cols = torch.arange(n, device=like.device, dtype=torch.float64)[None, :]
    m = (1 - frac) * (cols == low[:, None]) + frac * (cols == high[:, None])
    return m.to(like.dtype)


def upsample2x_bilinear_by_matmul(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)`` as two
    matrix products, whose backward is deterministic (``--deterministic`` on CUDA,
    where the interpolation's own backward refuses to run)."""
    n, c, h, w = x.shape
    exact = x if x.dtype in (torch.float32, torch.float64) else x.float()
    with torch.autocast(x.device.type, enabled=False):  # float32 weights, as interpolate's
        out = (_bilinear_matrix(h, exact) @ exact @ _bilinear_matrix(w, exact).t()).to(x.dtype)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else out


class Region(nn.Module):
    """A repeated unit of the network (a cell, a latent group): the unit that
    ``--compile regional`` compiles once per class and that activation checkpointing
    recomputes in backward (``hvae.model.compile.regions``).  A new kind of cell that
    derives from it joins both fast paths with no other change; the outermost
    regions are the ones used (a cell inside a latent group is compiled with it)."""


class EncCell(Region):
    """Encoder residual cell: BN-Swish-Conv3x3, BN-Swish-Conv3x3, SE.

    ``down=True`` makes it a stride-2 cell that doubles the channels, with a
    factorised-reduce skip.
    """

    def __init__(self, c_in: int, use_se: bool, down: bool = False):
        super().__init__()
        c_out = 2 * c_in if down else c_in
        self.bn0 = batch_norm(c_in)
        self.conv0 = Conv2d(c_in, c_out, 3, stride=2 if down else 1)
        self.bn1 = batch_norm(c_out)
        self.conv1 = Conv2d(c_out, c_out, 3)
        self.se = SE(c_out) if use_se else None
        self.skip = FactorizedReduce(c_in, c_out) if down else None
        self.c_out = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = bn_act_conv(x, self.bn0, self.conv0)
        h = bn_act_conv(h, self.bn1, self.conv1)
        if self.se is not None:
            h = self.se(h)
        skip = x if self.skip is None else self.skip(x)
        return torch.add(skip, h, alpha=BRANCH_SCALE)


class DecCell(Region):
    """Decoder (mbconv) residual cell: BN, Conv1x1 expanding the channels,
    BN-Swish, depthwise Conv5x5, BN-Swish, Conv1x1, BN, SE.

    ``up=True`` doubles the resolution (nearest, in the branch) and halves the
    channels, with a bilinear + 1x1 conv skip.  The convs inside are followed by
    BN, so they carry neither bias nor weight norm.
    """

    def __init__(self, c_in: int, expand: int, use_se: bool, up: bool = False):
        super().__init__()
        c_out = c_in // 2 if up else c_in
        hidden = c_in * expand
        self.up = up
        self.bn0 = batch_norm(c_in)
        self.conv0 = Conv2d(c_in, hidden, 1, bias=False, weight_norm=False)
        self.bn1 = batch_norm(hidden)
        self.conv1 = Conv2d(hidden, hidden, 5, groups=hidden, bias=False, weight_norm=False)
        self.bn2 = batch_norm(hidden)
        self.conv2 = Conv2d(hidden, c_out, 1, bias=False, weight_norm=False)
        self.bn3 = batch_norm(c_out)
        self.se = SE(c_out) if use_se else None
        self.skip = UpSkip(c_in, c_out) if up else None
        self.c_out = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = bn_act_conv(x, self.bn0, self.conv0, act=False, up=self.up)
        if h.device.type == "cpu":  # NCHW depthwise weight-grads are ~4x slower on CPU
            h = h.contiguous(memory_format=torch.channels_last)
        h = bn_act_conv(h, self.bn1, self.conv1)
        h = bn_act_conv(h, self.bn2, self.conv2)
        h = bn_forward(h, self.bn3)
        if self.se is not None:
            h = self.se(h)
        skip = x if self.skip is None else self.skip(x)
        return torch.add(skip, h, alpha=BRANCH_SCALE)


class EncCombiner(nn.Module):
    """Encoder combiner: x_enc + Conv1x1(x_dec) (posterior sees both paths)."""

    def __init__(self, c_enc: int, c_dec: int):
        super().__init__()
        self.conv = Conv2d(c_dec, c_enc, 1)

    def forward(self, x_enc: torch.Tensor, x_dec: torch.Tensor) -> torch.Tensor:
        return x_enc + self.conv(x_dec)


class DecCombiner(nn.Module):
    """Decoder combiner: Conv1x1 of the concatenated decoder state and latent sample."""

    def __init__(self, c_dec: int, c_z: int):
        super().__init__()
        self.conv = Conv2d(c_dec + c_z, c_dec, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, z.to(x.dtype)], dim=1))
