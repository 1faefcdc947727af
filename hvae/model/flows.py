"""Inverse-autoregressive flow cells applied to each posterior sample.

Two kinds (``Config.flow_type``), built by ``make_flow``:

``"nvae"`` (default), NVAE's cell: a volume-preserving shift z' = z - m(z), m
from masked convolutions autoregressive over spatial positions in raster order
and, at the same position, over channels.  Its Jacobian is triangular with a
unit diagonal, so its log-det is exactly 0; it takes no context (NVAE passes one
and ignores it).  Parameter names and shapes follow NVAE's one to one
(``scripts/import_nvae.py``), so a preset with flows has NVAE's parameter count.

``"affine"``, our context-conditioned affine IAF: a cell maps z to z' = z * exp(s) + m, where (m, s) for latent channel k are
computed by masked convolutions from the channels before k (in the cell's
channel order) and from an unmasked context (the encoder feature that produced
the posterior).  Ordering the Jacobian channel-major, it is block lower
triangular with diagonal blocks diag(exp(s)), so log|det| = sum(s): exact,
non-zero and context dependent.  Spatial positions may mix freely (3x3
kernels) because the autoregressive order runs over channels only.

``num_nf`` counts *pairs* of cells, as in NVAE's ``--num_nf``.  An affine pair
is a cell in channel order followed by one in reversed order, so every channel
is transformed conditioned on every other one; a shift pair is a cell in raster
order followed by one in reversed raster order (the same channel order).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvae.config import FLOW_TYPES
from hvae.distributions import at_least_fp32
from hvae.model.cells import Conv2d, elu

LOG_SCALE_BOUND = 3.0
SHIFT_EXPAND = 6       # hidden channels per latent channel in NVAE's cell
SHIFT_OUT_INIT = 0.1   # the output conv starts at a tenth of its norm (m near 0)


class MaskedConv2d(Conv2d):
    """Weight-normalised conv whose output unit with degree d sees input units
    with degree < d (``strict``) or <= d, at every kernel position (MADE masks
    over channels)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, deg_in: torch.Tensor,
                 deg_out: torch.Tensor, strict: bool, init_scale: float = 1.0):
        super().__init__(c_in, c_out, kernel_size, weight_norm=False)
        allowed = deg_out[:, None] > deg_in[None, :] if strict else deg_out[:, None] >= deg_in[None, :]
        mask = allowed[:, :, None, None].expand_as(self.weight).to(self.weight.dtype)
        self.register_buffer("mask", mask.contiguous(), persistent=False)
        with torch.no_grad():
            self.weight.mul_(self.mask * init_scale)
            norm = self._norm(self.weight).clamp_min(1e-3)
        self.log_weight_norm = nn.Parameter(norm.log())

    def weight_mask(self) -> torch.Tensor:
        return self.mask


class IAFCell(nn.Module):
    """One affine IAF step z -> z * exp(s) + m, autoregressive over channels.

    ``reverse`` flips the channel order.  The output conv starts at a tenth of
    its usual scale, so the cell starts near (not exactly at) the identity and
    its log-det is non-zero from the first step.
    """

    def __init__(self, num_z: int, c_context: int, reverse: bool, expand: int = 4):
        super().__init__()
        hidden = expand * num_z
        order = torch.arange(num_z)
        self.deg_z = order.flip(0) if reverse else order
        deg_h = torch.arange(hidden) * num_z // hidden
        self.inp = MaskedConv2d(num_z, hidden, 3, self.deg_z, deg_h, strict=True)
        self.context = Conv2d(c_context, hidden, 1)
        self.mid = MaskedConv2d(hidden, hidden, 3, deg_h, deg_h, strict=False)
        self.out = MaskedConv2d(hidden, 2 * num_z, 1, deg_h, torch.cat([self.deg_z, self.deg_z]),
                                strict=False, init_scale=0.1)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z', log|det dz'/dz|) in float32, the log-det per channel [B, L]
        (its sum over channels is the cell's log-det)."""
        h = elu(self.inp(z) + self.context(context))
        h = elu(self.mid(h))
        shift, log_scale = at_least_fp32(self.out(h)).chunk(2, dim=1)
        log_scale = LOG_SCALE_BOUND * torch.tanh(log_scale / LOG_SCALE_BOUND)
        z = at_least_fp32(z) * torch.exp(log_scale) + shift
        return z, log_scale.sum(dim=(2, 3))


class IAFFlow(nn.Module):
    """``num_pairs`` pairs of IAF cells (forward then reversed order) on one latent group."""

    def __init__(self, num_z: int, c_context: int, num_pairs: int):
        super().__init__()
        self.cells = nn.ModuleList(IAFCell(num_z, c_context, reverse=i % 2 == 1)
                                   for i in range(2 * num_pairs))

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z', log-det per channel [B, L]) after all cells."""
        log_det = None
        for cell in self.cells:
            z, ld = cell(z, context)
            log_det = ld if log_det is None else log_det + ld
        return z, log_det


# ------------------------------------------------------- NVAE's shift cell --
def ar_mask(kernel: int, centre: torch.Tensor, mirror: bool) -> torch.Tensor:
    """[c_out, c_in, k, k] 0/1 mask of a raster-order autoregressive conv.

    An output position sees every input row above it, the inputs to its left
    in its own row, and at its own position the channels that ``centre``
    ([c_out, c_in] booleans) allows.  ``mirror`` reverses the raster order
    (rows below, inputs to the right)."""
    c_out, c_in = centre.shape
    m = kernel // 2
    spatial = torch.zeros(kernel, kernel)
    spatial[:m] = 1.0
    spatial[m, :m] = 1.0
    mask = spatial.expand(c_out, c_in, kernel, kernel).clone()
    mask[:, :, m, m] = centre.float()
    return mask.flip(2, 3).contiguous() if mirror else mask


class ARConv2d(Conv2d):
    """Weight-normalised conv with a fixed 0/1 mask on its raw weight (norm of the
    masked weight, as NVAE's)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, mask: torch.Tensor,
                 groups: int = 1, bias: bool = False, init_scale: float = 1.0):
        super().__init__(c_in, c_out, kernel_size, groups=groups, bias=bias, weight_norm=False)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)
        with torch.no_grad():
            norm = self._norm(self.weight * self.mask).clamp_min(1e-3)
        self.log_weight_norm = nn.Parameter((norm * init_scale).log())

    def weight_mask(self) -> torch.Tensor:
        return self.mask


class ShiftCell(nn.Module):
    """NVAE's volume-preserving IAF cell: z' = z - m(z).

    m(z) = out(elu(elu(mid(elu(inp(z)))))) with ``inp`` a masked 3x3 conv whose
    hidden unit of degree d sees latent channels < d at its own position (zero
    diagonal: m_k never sees z_k), ``mid`` a masked depthwise 5x5 conv (its own
    position allowed) and ``out`` a masked 1x1 conv from hidden degrees <= k to
    channel k.  So dm/dz is strictly triangular and log|det| = 0 exactly.
    """

    def __init__(self, num_z: int, mirror: bool):
        super().__init__()
        hidden = SHIFT_EXPAND * num_z
        deg_z, deg_h = torch.arange(num_z), torch.arange(hidden) // SHIFT_EXPAND
        self.inp = ARConv2d(num_z, hidden, 3, ar_mask(3, deg_h[:, None] > deg_z[None, :], mirror))
        self.mid = ARConv2d(hidden, hidden, 5, ar_mask(5, torch.ones(hidden, 1, dtype=torch.bool), mirror),
                            groups=hidden)
        self.out = ARConv2d(hidden, num_z, 1, ar_mask(1, deg_z[:, None] >= deg_h[None, :], mirror),
                            bias=True, init_scale=SHIFT_OUT_INIT)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z', log-det per channel [B, L], all zeros); ``context`` is ignored."""
        weights = (self.inp.normalized_weight(), self.mid.normalized_weight(),
                   self.out.normalized_weight(), self.out.bias)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            m = _RecomputedShift.apply(z, self, *weights)  # keeps z, not five hidden tensors
        else:  # no backward, or a compiled region (its partitioner decides what to keep)
            m = self.shift(z, *weights)
        z = at_least_fp32(z) - at_least_fp32(m)
        return z, z.new_zeros(z.shape[:2])

    def shift(self, z, w_inp, w_mid, w_out, b_out) -> torch.Tensor:
        """m(z) from the given (normalised) weights."""
        h = elu(self.mid._conv_forward(elu(self.inp._conv_forward(z, w_inp, None)), w_mid, None))
        return self.out._conv_forward(elu(h), w_out, b_out)


class _RecomputedShift(torch.autograd.Function):
    """m(z) keeping only its inputs for backward, which runs m again.

    m's hidden layers have SHIFT_EXPAND times the latent channels and autograd
    would keep five of them (conv and ELU outputs): with flows at the fine
    scales, the largest memory item of a step (5.4 GiB of 21 for celebahq256
    b4 in bf16).  Recomputing them costs three small convs, and gives the same
    gradients (same ops, same autocast state, no randomness)."""

    @staticmethod
    def forward(ctx, z, cell, w_inp, w_mid, w_out, b_out):
        device = z.device.type
        ctx.cell, ctx.autocast = cell, (device, torch.is_autocast_enabled(device),
                                        torch.get_autocast_dtype(device))
        ctx.save_for_backward(z, w_inp, w_mid, w_out, b_out)
        return cell.shift(z, w_inp, w_mid, w_out, b_out)

    @staticmethod
    def backward(ctx, grad_m):
        saved = ctx.saved_tensors
        needed = [i for i in range(len(saved)) if ctx.needs_input_grad[i + 1 if i else 0]]  # skip `cell`
        inputs = [t.detach().requires_grad_(i in needed) for i, t in enumerate(saved)]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            m = ctx.cell.shift(*inputs)
        grads = torch.autograd.grad(m, [inputs[i] for i in needed], grad_m)
        out = [None] * len(saved)
        for i, g in zip(needed, grads):
            out[i] = g
        return out[0], None, *out[1:]


class ShiftFlow(nn.Module):
    """``num_pairs`` pairs of NVAE's shift cells (raster order, then mirrored) on one group."""

    def __init__(self, num_z: int, num_pairs: int):
        super().__init__()
        self.cells = nn.ModuleList(ShiftCell(num_z, mirror=i % 2 == 1) for i in range(2 * num_pairs))

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z', log-det per channel [B, L]: zeros)."""
        for cell in self.cells:
            z, log_det = cell(z)
        return z, log_det


def make_flow(flow_type: str, num_z: int, c_context: int, num_pairs: int) -> nn.Module:
    """The flow of one latent group: ``flow(z, context) -> (z', log-det per channel [B, L])``."""
    if flow_type == "nvae":
        return ShiftFlow(num_z, num_pairs)
    if flow_type == "affine":
        return IAFFlow(num_z, c_context, num_pairs)
    raise ValueError(f"flow_type must be one of {FLOW_TYPES}, got {flow_type!r}")
