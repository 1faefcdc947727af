"""The training objective: NELBO, KL warm-up and balancing, free bits, regularisers.

    loss  = mean_b[ recon_b + kl_weight * sum_i c_i * KLfb_i,b ] + lambda * (spectral + bn)
    nelbo = recon_b + sum_i KL_i,b              (per image, weight 1, never regularised)

``kl_weight`` is the warm-up schedule times ``config.kl_beta`` and lambda the
regulariser weight, both from ``hvae.schedules``; ``c_i`` are the
detached per-group balancing coefficients (all 1 once the warm-up is over);
``KLfb`` is the KL with free bits applied (see ``free_bits_kl``).  The NELBO is
what gets reported (nats per image, or bits per dim via ``bits_per_dim``).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from hvae.model.bank import shared_stack

BALANCE_EPS = 0.01  # added to each group's mean |KL| so unused groups keep a coefficient > 0


# ------------------------------------------------------------ KL balancing
def group_prior_weights(group_scale: Sequence[int]) -> Tensor:
    """Per-group balancing weight 1 / alpha_i = n_s / 4**s, top (coarsest) group first.

    ``group_scale``: each group's scale index, 0 = coarsest (``model.group_scale``).
    Group i at scale s has 4**s times as many spatial positions as a
    coarsest-scale group, so its KL, summed over those positions, is 4**s
    times larger for the same information per position.  Balancing judges each
    group by its KL *per position*: the coefficient is divided by that size
    (alpha_i = 4**s / n_s, n_s = number of groups at scale s).  This is NVAE's
    code (``kl_balancer_coeff(..., fun='square')`` used as a divisor); the
    paper's "proportional to the size" is a typo its author corrected in NVAE
    issue 26.  For equal KL per group a scale-s group's coefficient is
    n_s / (4**s * n_0) times the top group's.  Normalised to mean 1 over
    groups (only ratios matter: the coefficients are renormalised anyway).
    """
    counts = Counter(group_scale)
    w = torch.tensor([counts[s] / 4.0 ** s for s in group_scale], dtype=torch.float32)
    return w / w.mean()


def _stack_groups(kl_groups: Sequence[Tensor] | Tensor) -> Tensor:
    """[B, G] float32 from a list of [B] tensors (or an already stacked [B, G])."""
    kl = kl_groups if isinstance(kl_groups, Tensor) else torch.stack(list(kl_groups), dim=1)
    return kl.float()


def balance_coeffs(kl: Tensor, weights: Tensor) -> Tensor:
    """c_i proportional to (mean_b |KL_i,b| + 0.01) * w_i, mean 1 over groups, detached
    (``w`` from ``group_prior_weights``: n_s / 4**s)."""
    kl = kl.detach()
    raw = (kl.abs().mean(dim=0) + BALANCE_EPS) * weights.to(kl.device, kl.dtype)
    return raw / raw.mean()


def kl_balance(kl_groups, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(balanced KL per example [B] = sum_i c_i KL_i, coefficients c [G] detached).

    Balancing acts only during the KL warm-up (the caller passes ``weights``
    then, None otherwise; see ``Schedule.balancing``): it lowers the weight of
    groups with small KL so they are not switched off early.  With None, c = 1.
    """
    kl = _stack_groups(kl_groups)
    if weights is not None:
        if weights.numel() != kl.shape[1]:
            raise ValueError(f"{weights.numel()} balancing weights for {kl.shape[1]} KL groups")
        coeffs = balance_coeffs(kl, weights)
    else:
        coeffs = torch.ones(kl.shape[1], device=kl.device, dtype=kl.dtype)
    return (kl * coeffs).sum(dim=1), coeffs


def free_bits_kl(kl: Tensor, coeffs: Tensor, free_bits: float) -> Tensor:
    """Per-example KL term with free bits: its batch mean is sum_i c_i max(mean_b KL_i, fb).

    A group whose batch-mean KL is at or below ``free_bits`` nats contributes the
    constant ``free_bits`` (no gradient: it is free to use that much
    information); otherwise its per-example KL passes through unchanged.  Loss only.
    """
    if free_bits <= 0:
        return (kl * coeffs).sum(dim=1)
    above = kl.detach().mean(dim=0) > free_bits
    clipped = torch.where(above, kl, torch.full_like(kl, free_bits))
    return (clipped * coeffs).sum(dim=1)


# ------------------------------------------------------------ regularisers
def _conv_matrix(module: nn.Module) -> Tensor:
    """The weight the conv applies, as [C_out, C_in*k*k] (``normalized_weight()`` when it has one)."""
    weight = module.normalized_weight() if hasattr(module, "normalized_weight") else module.weight
    return weight.reshape(weight.shape[0], -1)


def _stacked_matrices(mods: list[nn.Module]) -> Tensor:
    """[N, C_out, C_in*k*k]: the step's shared stack of these convs if there is one
    (``hvae.model.bank``: gradients then meet once per group), else a new stack."""
    stack = shared_stack(mods)
    matrices = stack.matrices() if stack is not None else None
    return matrices if matrices is not None else torch.stack([_conv_matrix(m) for m in mods])


def _is_regularised_conv(module: nn.Module) -> bool:
    """Weight-normalised convs (duck-typed by ``normalized_weight()``) and any plain conv.

    Linear layers (the SE gates) are left out, as in NVAE, which only constrains
    its convolutions.
    """
    return callable(getattr(module, "normalized_weight", None)) or isinstance(module, _ConvNd)


class SpectralRegularizer(nn.Module):
    """Sum of the largest singular values of the model's conv weights (power iteration).

    Weights of equal matrix shape [C_out, C_in*k*k] are stacked so that one
    ``bmm`` per iteration serves them all.  The left/right vectors ``u_<m>x<n>``
    [N, m] and ``v_<m>x<n>`` [N, n] are buffers, so ``state_dict()`` carries them
    into checkpoints; they start from a fixed-seed random draw (identical on
    every DDP rank, and the global RNG is untouched).  Each call runs
    ``num_power_iter`` no-grad iterations (the first call ever
    ``first_call_factor`` times as many) and returns sum u^T W v, whose gradient
    w.r.t. W is u v^T, the gradient of the top singular value.

    Pass the plain model (not a DDP / compile wrapper).  Its convs are held
    by reference only, never as submodules, so their parameters stay out of
    this module's ``state_dict``.  Whether the first call is done is persisted
    in the ``initialized`` buffer and read on the host once, not every call.
    """

    def __init__(self, model: nn.Module, num_power_iter: int = 4, first_call_factor: int = 10,
                 seed: int = 0):
        super().__init__()
        self.num_power_iter = int(num_power_iter)
        self.first_call_factor = int(first_call_factor)
        self._groups: list[tuple[str, list[str], list[nn.Module]]] = []
        by_shape: dict[tuple[int, int], tuple[list[str], list[nn.Module]]] = {}
        for name, module in model.named_modules():
            if _is_regularised_conv(module):
                with torch.no_grad():
                    w = _conv_matrix(module)
                if w.numel():
                    names, mods = by_shape.setdefault(tuple(w.shape), ([], []))
                    names.append(name)
                    mods.append(module)
        gen = torch.Generator().manual_seed(seed)
        for (m, n), (names, mods) in by_shape.items():
            key = f"{m}x{n}"
            ref = mods[0].weight
            for prefix, size in (("u", m), ("v", n)):
                vec = F.normalize(torch.randn(len(mods), size, generator=gen), dim=1)
                self.register_buffer(f"{prefix}_{key}", vec.to(ref.device, ref.dtype))
            self._groups.append((key, names, mods))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized_on_host: bool | None = None  # cache of the buffer: no sync per call
        self._ids: dict = {}  # row ids of the flat vector layout, per device (_row_ids)
        self.register_load_state_dict_post_hook(lambda module, _: module.forget_host_flag())

    def forget_host_flag(self) -> None:
        """Re-read ``initialized`` at the next call (after its buffer was loaded or restored)."""
        self._initialized_on_host = None

    @property
    def settled(self) -> bool:
        """Whether the host knows that the longer first call is done: every later call
        runs the same kernels (what a CUDA-graph capture needs)."""
        return self._initialized_on_host is True

    @property
    def num_weights(self) -> int:
        return sum(len(mods) for _, _, mods in self._groups)

    def _vectors(self, key: str, like: Tensor) -> tuple[Tensor, Tensor]:
        """The u, v buffers of a group, moved to the weights' device/dtype if they were not."""
        for prefix in ("u", "v"):
            name = f"{prefix}_{key}"
            buf = self._buffers[name]
            if buf.device != like.device or buf.dtype != like.dtype:
                self._buffers[name] = buf.to(like.device, like.dtype)
        return self._buffers[f"u_{key}"], self._buffers[f"v_{key}"]

    def _row_ids(self, sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, int]:
        """For vectors of all groups laid end to end (group g: N_g rows of length k_g),
        the row of every element, and the number of rows (cached per layout)."""
        key = (tuple(sizes), device)
        if key not in self._ids:
            lengths = torch.tensor([k for n, k in sizes for _ in range(n)])
            rows = torch.arange(len(lengths)).repeat_interleave(  # output_size: no data read
                lengths, output_size=sum(k * n for n, k in sizes))
            self._ids[key] = (rows.to(device), len(lengths))
        return self._ids[key]

    @torch.no_grad()
    def _power_iteration(self, weights: list[Tensor], iters: int) -> tuple[list[Tensor], list[Tensor]]:
        """``iters`` batched iterations for every group; returns each group's (u, v)
        and stores them in the buffers.

        The vectors of all groups live in one flat tensor (u's, and v's), each
        group's bmm writing into its slice, so one normalisation serves all the
        groups: a few ops per iteration instead of three per group.
        """
        bufs = [self._vectors(key, w) for (key, _, _), w in zip(self._groups, weights)]
        layout = []
        for which in (0, 1):  # u, then v
            flat = torch.cat([b[which].reshape(-1) for b in bufs])
            sizes = [tuple(b[which].shape) for b in bufs]
            views = [part.view(n, k, 1) for part, (n, k) in
                     zip(flat.split([n * k for n, k in sizes]), sizes)]
            layout.append((flat, views, *self._row_ids(sizes, flat.device)))
        (u_flat, us, u_ids, u_rows), (v_flat, vs, v_ids, v_rows) = layout
        for _ in range(iters):
            for w, u, v in zip(weights, us, vs):
                torch.bmm(w.transpose(1, 2), u, out=v)
            _normalize_rows_(v_flat, v_ids, v_rows)
            for w, u, v in zip(weights, us, vs):
                torch.bmm(w, v, out=u)
            _normalize_rows_(u_flat, u_ids, u_rows)
        us, vs = [u.squeeze(2) for u in us], [v.squeeze(2) for v in vs]
        torch._foreach_copy_([b for pair in bufs for b in pair], [t for uv in zip(us, vs) for t in uv])
        return us, vs  # fresh tensors, not the buffers: the next call may not change them

    def singular_values(self) -> dict[str, Tensor]:
        """Module name -> differentiable estimate of its top singular value (runs the iteration)."""
        if self._initialized_on_host is None:  # once after construction or loading
            self._initialized_on_host = bool(self.initialized)
        iters = self.num_power_iter * (1 if self._initialized_on_host else self.first_call_factor)
        out: dict[str, Tensor] = {}
        weights = [_stacked_matrices(mods) for _, _, mods in self._groups]
        if weights:
            with torch.autocast(weights[0].device.type, enabled=False):
                us, vs = self._power_iteration([w.detach() for w in weights], iters)
                for (_, names, _), w, u, v in zip(self._groups, weights, us, vs):
                    sigma = torch.bmm(u.unsqueeze(1), torch.bmm(w, v.unsqueeze(2))).flatten()
                    out.update(zip(names, sigma.float().unbind(0)))
        if not self._initialized_on_host:
            self.initialized.fill_(True)
            self._initialized_on_host = True
        return out

    def forward(self) -> Tensor:
        sigmas = list(self.singular_values().values())
        return torch.stack(sigmas).sum() if sigmas else torch.zeros(())


def bn_regularizer(model: nn.Module) -> Tensor:
    """Sum over BatchNorm layers (SyncBatchNorm included) of max |gamma|: keeps BN scales small.

    Layers with gammas of equal size are stacked, so it costs a few ops per size
    rather than per layer (the gradient is the same: ties share it evenly).
    """
    by_size: dict[tuple, list[nn.Module]] = {}
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None and m.weight.numel():
            by_size.setdefault((m.weight.numel(), m.weight.dtype, m.weight.device), []).append(m)
    terms = []
    for mods in by_size.values():
        stack = shared_stack(mods)  # the step's stacked gammas (hvae.model.bank), if any
        gammas = stack.tensor if stack is not None else torch.stack([m.weight for m in mods])
        terms.append(gammas.abs().amax(dim=1).float().sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _normalize_rows_(flat: Tensor, row_ids: Tensor, rows: int, eps: float = 1e-12) -> None:
    """Divide each row of a flat tensor (rows given by ``row_ids``) by its L2 norm
    (at least ``eps``, as F.normalize), in place."""
    norms = flat.new_zeros(rows).index_add_(0, row_ids, flat * flat).sqrt_().clamp_min_(eps)
    flat.div_(norms.index_select(0, row_ids))


# --------------------------------------------------------------- the loss
def bits_per_dim(nats, data_dims: int):
    """Convert nats per image to bits per dimension (pixel value)."""
    return nats / (data_dims * math.log(2.0))


def nelbo(recon: Tensor, kl_groups) -> Tensor:
    """The negative ELBO per image [B]: -log p(x|z) + sum_i KL_i (weight 1, in nats).

    The one definition used by training, validation and the IW evaluation."""
    kl = kl_groups if isinstance(kl_groups, Tensor) else torch.stack(list(kl_groups), dim=1)
    return recon + kl.to(recon.dtype).sum(dim=1)


@dataclass
class Loss:
    """One batch's loss: ``loss`` is the only field attached to the graph.

    The reported terms (detached) live in two dicts that the step, the micro-batch
    accumulation and the logged metrics iterate over, so a new term is one entry here:
    ``per_image`` holds [B] tensors (logged as batch means, concatenated over
    micro-batches), ``summary`` batch summaries (logged as they are: scalars, or one
    value per group; averaged over micro-batches by their images).  ``reg``, the
    regulariser term, is added once per update, so it is kept apart.  The terms read as
    attributes too (``loss.nelbo``)."""
    loss: Tensor                # scalar to back-propagate
    reg: Tensor                 # scalar: the regulariser term added to the loss
    per_image: dict[str, Tensor]
    summary: dict[str, Tensor]

    def __getattr__(self, name: str) -> Tensor:
        for terms in (self.__dict__.get("per_image", {}), self.__dict__.get("summary", {})):
            if name in terms:
                return terms[name]
        raise AttributeError(name)


def compute_loss(recon: Tensor, kl_groups, *, kl_weight: float,
                 balance_weights: Tensor | None = None, free_bits: float = 0.0,
                 reg: Tensor | None = None) -> Loss:
    """The training loss of one batch and its unregularised NELBO.

    ``recon``: -log p(x|z) [B]; ``kl_groups``: [B, G] or a list of [B];
    ``kl_weight``: warm-up times beta; ``balance_weights``: the balancing
    weights while balancing is on, else None; ``free_bits``: nats per group;
    ``reg``: lambda * (spectral + BN) terms, already weighted.  No host sync.
    """
    recon = recon.float()
    kl = _stack_groups(kl_groups)
    _, coeffs = kl_balance(kl, balance_weights)
    kl_term = kl_weight * free_bits_kl(kl, coeffs, free_bits)
    objective = (recon + kl_term).mean()
    reg = objective.new_zeros(()) if reg is None else reg.to(objective.device)
    per_image = {"nelbo": nelbo(recon, kl).detach(),  # KL weight 1, no free bits, no regulariser
                 "recon": recon.detach()}             # -log p(x|z)
    summary = {"kl_groups": kl.detach().mean(dim=0),  # [G] batch-mean KL per group
               "kl_coeffs": coeffs.detach(),          # [G] balancing coefficients (1 when off)
               "kl_term": kl_term.mean().detach()}    # the weighted KL actually in the loss
    return Loss(loss=objective + reg, reg=reg.detach(), per_image=per_image, summary=summary)


# ----------------------------------------------------------- active units
def active_units(kl_per_channel_batches, threshold: float = 0.01) -> list[int]:
    """Per group, the number of latent channels whose mean KL over the data exceeds ``threshold``.

    Input: an iterable of batches, each a list (one entry per group) of [B, L]
    per-channel KL tensors (``output.kl_per_channel``); a single batch is also
    accepted.  A channel is active when its KL (nats, summed over positions)
    averaged over all examples seen is above the threshold: a collapsed channel
    has posterior = prior and KL ~ 0.
    """
    batches = list(kl_per_channel_batches)
    if batches and isinstance(batches[0], Tensor):
        batches = [batches]
    if not batches:
        return []
    totals = [torch.zeros(g.shape[1], dtype=torch.float64) for g in batches[0]]
    count = 0
    for batch in batches:
        for total, group in zip(totals, batch):
            total += group.detach().double().sum(dim=0).cpu()
        count += batch[0].shape[0]
    return [int((total / count > threshold).sum()) for total in totals]
