"""Inverse-autoregressive flow cells applied to each posterior sample.

A cell maps z to z' = z * exp(s) + m, where (m, s) for latent channel k are
computed by masked convolutions from the channels before k (in the cell's
channel order) and from an unmasked context (the encoder feature that produced
the posterior).  Ordering the Jacobian channel-major, it is block lower
triangular with diagonal blocks diag(exp(s)), so log|det| = sum(s): exact,
non-zero and context dependent.  Spatial positions may mix freely (3x3
kernels) because the autoregressive order runs over channels only.

``num_nf`` counts *pairs* of cells, as in NVAE's ``--num_nf``: each pair is a
cell in channel order followed by one in reversed order, so every channel is
transformed conditioned on every other one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvae.distributions import at_least_fp32
from hvae.model.cells import Conv2d, elu

LOG_SCALE_BOUND = 3.0


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
