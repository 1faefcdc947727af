"""The NVAE tower (Vahdat & Kautz, 2020): bottom-up encoder, top-down decoder
with a residual-Normal posterior per latent group, optional flow cells.

    x -> pad, 2x-1 -> stem -> pre-processing blocks -> encoder tower (finest
    scale first; the feature after each group's cells is kept) -> ELU-Conv-ELU
    for the top group.

    learned h0 -> for each group i (top first), ``LatentGroup``:
        [first group of a finer scale] up-sampling cell
        [i > 0] decoder cells; prior p_i = ELU-Conv1x1(state)
        posterior q_i = Normal of the raw sums (mu_p + dmu, log sigma_p + dlog sigma),
                        the deltas from Conv3x3(encoder feature + Conv1x1(decoder state))
        z ~ q_i -> flow cells (NVAE's shift, or the context-conditioned affine IAF)
                -> state = Conv1x1([state, z])
    -> post-processing blocks -> ELU-Conv3x3 -> Bernoulli logits or DML params.

Every latent Normal is NVAE's: mu = 5 tanh(raw / 5), sigma = exp(5 tanh(raw / 5))
+ 0.01 (``hvae.distributions.nvae_normal_params``), so NVAE's checkpoints
compute the same function here (``scripts/import_nvae.py``).

Latent groups are indexed top (coarsest) first everywhere.  One top-down loop
(``NVAE.top_down``) serves training, encoding, decoding and sampling; sampling
runs the decoder alone.  The model returns tensors only (``NVAEOutput``), so it
compiles as one graph; latent terms are float32 even under autocast, and the
output distribution is built on access, outside the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hvae.config import Config
from hvae.distributions import (Bernoulli, DiscMixLogistic, nvae_normal_params, normal_log_prob,
                                is_channels_last, residual_kl, standard_normal_like)
from hvae.model.bank import stacked_weights
from hvae.model.cells import ELU, Conv2d, DecCell, DecCombiner, EncCell, EncCombiner, Region
from hvae.model.flows import make_flow

OUTPUTS = ("auto", "sample", "mean")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def repeat_images(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``x.repeat_interleave(repeats, 0)`` in ``x``'s memory layout.

    repeat_interleave returns NCHW-contiguous tensors; fed to a channels-last
    model they send every conv and BatchNorm after them down the slow layout
    path (the CPU's importance-weighted evaluation ran about 2x slower).
    """
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).repeat_interleave(repeats, dim=0).permute(0, 3, 1, 2)
    return x.repeat_interleave(repeats, dim=0)


def raw_normal_params(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's 2L output channels -> raw (mu, log sigma), in float32 (not yet clamped:
    NVAE clamps the *sums* of raw prior and posterior outputs)."""
    mu, log_sigma = raw.float().chunk(2, dim=1)
    return mu, log_sigma


class Likelihood:
    """The output distribution over the real (unpadded) pixels.

    Takes and returns images in [0, 1] (the data's space): ``log_prob(x)`` maps
    x to the distribution's space itself (2x - 1 for the logistic mixture,
    unchanged for Bernoulli), so callers pass the same x given to the model.
    """

    def __init__(self, params: torch.Tensor, spec: "OutputSpec"):
        self.binary = spec.binary
        self.dist = (Bernoulli(params) if spec.binary
                     else DiscMixLogistic(params, spec.num_bits, channels=spec.channels))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per image, [B], in nats.

        In training, the logistic mixture's elementwise work (about fifteen
        [B, C, M, H, W] float32 tensors) is recomputed in backward from its
        parameters instead of kept: same values, a few cheap kernels more."""
        if self.binary:
            return self.dist.log_prob(x)
        y = 2.0 * x - 1.0
        if (torch.is_grad_enabled() and self.dist.params.requires_grad
                and not torch.compiler.is_compiling()):
            return checkpoint(self.dist.log_prob, y, use_reentrant=False, preserve_rng_state=False)
        return self.dist.log_prob(y)

    def _to_unit(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.binary else (y + 1.0) * 0.5

    def sample(self, t: float = 1.0) -> torch.Tensor:
        return self._to_unit(self.dist.sample(t))

    def mean(self) -> torch.Tensor:
        return self._to_unit(self.dist.mean())


@dataclass(frozen=True)
class OutputSpec:
    """What the output parameters mean: Bernoulli logits, or a logistic mixture."""
    binary: bool
    num_bits: int
    channels: int


class GroupStats(NamedTuple):
    """One latent group's tensors from a posterior pass (per-channel terms summed over positions)."""
    z: torch.Tensor               # the sample after any flows, [B, L, h, w]
    kl: torch.Tensor              # [B, L]: analytic KL, or log q - log p (flows / Monte Carlo)
    log_q: torch.Tensor           # [B, L]: log q(z|x), flow log-dets included
    log_p: torch.Tensor           # [B, L]: log p(z)
    q_mu: torch.Tensor            # posterior before the flows, [B, L, h, w]
    q_log_sigma: torch.Tensor
    p_mu: torch.Tensor            # prior
    p_log_sigma: torch.Tensor


@dataclass
class NVAEOutput:
    """Tensors from one forward pass; lists have one entry per latent group, top first.

    Only tensors (and the constant ``spec``): the distributions are built on
    access (``likelihood``), outside any compiled region.
    """
    params: torch.Tensor                # output-distribution parameters (unpadded, float32)
    spec: OutputSpec
    kl_per_channel: list[torch.Tensor]  # [B, L] (see GroupStats.kl)
    log_q_per_channel: list[torch.Tensor]  # [B, L]
    log_p_per_channel: list[torch.Tensor]  # [B, L]
    z: list[torch.Tensor]
    q_mu: list[torch.Tensor]
    q_log_sigma: list[torch.Tensor]
    p_mu: list[torch.Tensor]
    p_log_sigma: list[torch.Tensor]

    @property
    def likelihood(self) -> Likelihood:
        return Likelihood(self.params, self.spec)

    @property
    def kl(self) -> list[torch.Tensor]:
        """[B] per group: the KL term of the objective."""
        return [k.sum(dim=1) for k in self.kl_per_channel]

    @property
    def kl_groups(self) -> torch.Tensor:
        """[B, G]: ``kl`` stacked (two ops for all groups; the training loss takes this)."""
        return torch.stack(self.kl_per_channel, dim=1).sum(dim=2)

    @property
    def log_q(self) -> list[torch.Tensor]:
        """[B] per group: log q(z|x) of the sampled z, flow log-dets included."""
        return [t.sum(dim=1) for t in self.log_q_per_channel]

    @property
    def log_p(self) -> list[torch.Tensor]:
        """[B] per group: log p(z) of the sampled z."""
        return [t.sum(dim=1) for t in self.log_p_per_channel]


def posterior_step(q_raw_mu: torch.Tensor, q_raw_log_sigma: torch.Tensor,
                   p_raw_mu: torch.Tensor, p_raw_log_sigma: torch.Tensor, draw, flow,
                   context: torch.Tensor, analytic_kl: bool = True) -> GroupStats:
    """One latent group's distributions, sample and KL from its networks' raw outputs:
    the function to replace for another posterior or prior family.

    NVAE's Normals: mu = 5 tanh(raw / 5), sigma = exp(5 tanh(raw / 5)) + 0.01
    (``nvae_normal_params``); the residual form is already in the raw posterior
    outputs (the caller adds the prior's).  ``draw(like)`` gives N(0, 1) noise shaped
    like ``like`` (None: take the posterior mean).  ``flow`` (or None) maps z and
    returns its log-det.  ``analytic_kl`` asks for the closed-form KL (Eq. 2 of the
    effective parameters); with a flow the KL is the Monte-Carlo log q(z) - log p(z).
    """
    q_mu, q_log_sigma = nvae_normal_params(q_raw_mu, q_raw_log_sigma)
    p_mu, p_log_sigma = nvae_normal_params(p_raw_mu, p_raw_log_sigma)
    # z = mu + sigma * eps, so log q(z) = -eps^2 / 2 - log sigma - log(2 pi) / 2
    # needs no (z - mu) / sigma and keeps no extra tensors for backward.
    if draw is None:
        z, neg_log_q = q_mu, q_log_sigma
    else:
        eps = draw(q_mu)
        z = torch.addcmul(q_mu, torch.exp(q_log_sigma), eps)
        neg_log_q = torch.addcmul(q_log_sigma, eps, eps, value=0.5)
    log_det = None
    if flow is not None:
        z, log_det = flow(z, context)                                # log_det [B, L]
    analytic = analytic_kl and flow is None
    # log q / log p carry gradients only where they form the KL.
    with torch.set_grad_enabled(torch.is_grad_enabled() and not analytic):
        log_p_el = normal_log_prob(z, p_mu, p_log_sigma)
        log_q_el = -(neg_log_q + HALF_LOG_2PI)
        log_p, log_q = log_p_el.sum(dim=(2, 3)), log_q_el.sum(dim=(2, 3))  # [B, L]
    if log_det is not None:
        log_q = log_q - log_det
    if analytic:
        kl = residual_kl(q_mu - p_mu, q_log_sigma - p_log_sigma, p_log_sigma)
        kl, log_q = kl.sum(dim=(2, 3)), log_q.detach()
    else:  # log q - log p, differenced per element (two large sums would lose digits)
        kl = (log_q_el - log_p_el).sum(dim=(2, 3))
        kl = kl if log_det is None else kl - log_det
    return GroupStats(z, kl, log_q, log_p, q_mu, q_log_sigma, p_mu, p_log_sigma)


class LatentGroup(Region):
    """One step of the top-down pass (cf. VDVAE's DecBlock): enter the group's
    scale, read the prior, draw z from the posterior (or the prior), combine.

    The top group has no decoder cells, a fixed prior (raw outputs 0, 0, so
    N(0, 1.01^2) with the sigma floor) and takes its
    posterior from the encoder alone.  A group that starts a finer scale first
    up-samples the state (``up``).
    """

    def __init__(self, cfg: Config, c_enc: int, c_dec: int, top: bool, up_from: int | None):
        super().__init__()
        L = self.num_latent = cfg.num_latent_per_group
        self.top = top
        self.residual = cfg.res_dist and not top
        self.up = DecCell(up_from, cfg.dec_cell_expand, cfg.use_se, up=True) if up_from else None
        if not top:
            self.dec_cells = nn.Sequential(*[DecCell(c_dec, cfg.dec_cell_expand, cfg.use_se)
                                             for _ in range(cfg.num_cell_per_cond_dec)])
            self.prior = nn.Sequential(ELU(), Conv2d(c_dec, 2 * L, 1))
            self.enc_combiner = EncCombiner(c_enc, c_dec)
        self.posterior = Conv2d(c_enc, 2 * L, 3)
        self.flow = make_flow(cfg.flow_type, L, c_enc, cfg.num_nf) if cfg.num_nf > 0 else None
        self.combiner = DecCombiner(c_dec, L)
        # set by activation checkpointing (hvae.model.remat): the posterior noise is taped
        # in forward and replayed when backward recomputes the group, so no RNG state is
        # saved or restored (which a CUDA-graph capture could not hold)
        self.noise_tape = None

    def _enter(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder state at this group, raw prior mu, raw prior log sigma)."""
        if self.up is not None:
            state = self.up(state)
        if self.top:
            zeros = state.new_zeros((state.shape[0], self.num_latent, *state.shape[2:]),
                                    dtype=torch.float32)
            return state, zeros, zeros
        state = self.dec_cells(state)
        return (state, *raw_normal_params(self.prior(state)))

    def forward(self, state: torch.Tensor, enc_feature: torch.Tensor, use_mean: bool = False,
                analytic_kl: bool = True) -> tuple[torch.Tensor, GroupStats]:
        """Posterior step: (next decoder state, this group's tensors).

        As in NVAE, the residual posterior is the Normal of the *sums* of the raw
        prior and raw posterior outputs (clamped after adding, in ``posterior_step``,
        which does the distributions' arithmetic), and every sigma has the 0.01
        floor.  The stored log sigmas are those of the effective sigmas, so log q,
        log p, the KL and sampling all use one Normal.
        """
        state, p_raw_mu, p_raw_log_sigma = self._enter(state)
        context = enc_feature if self.top else self.enc_combiner(enc_feature, state)
        q_raw_mu, q_raw_log_sigma = raw_normal_params(self.posterior(context))
        if self.residual:  # the raw deltas add to the raw prior outputs
            q_raw_mu, q_raw_log_sigma = p_raw_mu + q_raw_mu, p_raw_log_sigma + q_raw_log_sigma
        draw = None if use_mean else (
            standard_normal_like if self.noise_tape is None else self.noise_tape)
        stats = posterior_step(q_raw_mu, q_raw_log_sigma, p_raw_mu, p_raw_log_sigma, draw,
                               self.flow, context, analytic_kl)
        return self.combiner(state, stats.z), stats

    def sample(self, state: torch.Tensor, t: float = 1.0, z: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Prior step: the next decoder state for the given ``z``, or for
        z ~ N(mu_p, (t sigma_p)^2) when ``z`` is None (t scales the floored sigma, as in NVAE)."""
        state, p_raw_mu, p_raw_log_sigma = self._enter(state)
        if z is None:
            p_mu, p_log_sigma = nvae_normal_params(p_raw_mu, p_raw_log_sigma)
            z = p_mu + (t * torch.exp(p_log_sigma)) * standard_normal_like(p_mu)
        return self.combiner(state, z)


def _plain_strides_where_contiguous(module: nn.Module) -> None:
    """Restride (no copy) the parameters that are both channels-last and contiguous, the
    [o, i, 1, 1] weights, to plain strides.  The channels-last conversion gives their
    size-1 dimensions strides that autograd's gradients do not have, and DDP then warns
    that every such gradient's strides differ from its parameter's."""
    for p in module.parameters():
        if p.is_contiguous():  # flattened and viewed back: the same memory, plain strides
            p.data = p.data.view(-1).view(p.shape)


class NVAE(nn.Module):
    """NVAE built from a ``Config``; see the module docstring for the data flow."""

    def __init__(self, config: Config):
        super().__init__()
        cfg = self.config = config.validate()
        if cfg.num_postprocess_blocks != cfg.num_preprocess_blocks:
            raise ValueError("num_postprocess_blocks must equal num_preprocess_blocks "
                             "(each post-processing block undoes one pre-processing down-sampling)")
        L, S, P = cfg.num_latent_per_group, cfg.num_latent_scales, cfg.num_preprocess_blocks
        groups = cfg.groups_per_scale()                      # coarsest first
        self.group_scale = [scale for scale, n in enumerate(groups) for _ in range(n)]
        self.num_groups = len(self.group_scale)
        top_size = cfg.padded_size // cfg.downsample_factor
        c_enc = [cfg.num_channels_enc * 2 ** (P + S - 1 - scale) for scale in range(S)]
        c_dec = [cfg.num_channels_dec * 2 ** (P + S - 1 - scale) for scale in range(S)]
        self.latent_shapes = [(L, top_size * 2 ** scale, top_size * 2 ** scale)
                              for scale in self.group_scale]
        self.data_dims = cfg.in_channels * cfg.image_size ** 2
        self.output_spec = OutputSpec(cfg.binary, cfg.num_x_bits, cfg.in_channels)
        use_se = cfg.use_se

        # Bottom-up: stem, pre-processing (each block ends by halving the resolution).
        self.stem = Conv2d(cfg.in_channels, cfg.num_channels_enc, 3)
        pre, c = [], cfg.num_channels_enc
        for _ in range(P):
            pre += [EncCell(c, use_se) for _ in range(cfg.num_preprocess_cells - 1)]
            pre.append(EncCell(c, use_se, down=True))
            c *= 2
        self.pre = nn.Sequential(*pre)
        # Encoder tower: per group (indexed top first, run in reverse), then a
        # down-sampling cell into each coarser scale (enc_down[scale] feeds that scale).
        self.enc_cells = nn.ModuleList(
            nn.Sequential(*[EncCell(c_enc[scale], use_se) for _ in range(cfg.num_cell_per_cond_enc)])
            for scale in self.group_scale)
        self.enc_down = nn.ModuleList(EncCell(c_enc[scale + 1], use_se, down=True)
                                      for scale in range(S - 1))
        self.enc0 = nn.Sequential(ELU(), Conv2d(c_enc[0], c_enc[0], 1), ELU())

        # Top-down: learned initial state, then the latent groups; the first
        # group of each finer scale up-samples from the scale above.
        self.h0 = nn.Parameter(torch.rand(1, c_dec[0], top_size, top_size))
        self.groups = nn.ModuleList(
            LatentGroup(cfg, c_enc[scale], c_dec[scale], top=i == 0,
                        up_from=c_dec[scale - 1] if i > 0 and scale != self.group_scale[i - 1] else None)
            for i, scale in enumerate(self.group_scale))
        post, c = [], c_dec[-1]
        for _ in range(cfg.num_postprocess_blocks):
            post.append(DecCell(c, cfg.post_cell_expand, use_se, up=True))
            c //= 2
            post += [DecCell(c, cfg.post_cell_expand, use_se) for _ in range(cfg.num_postprocess_cells - 1)]
        self.post = nn.Sequential(*post)
        out_channels = (cfg.in_channels if cfg.binary
                        else DiscMixLogistic.num_params(cfg.in_channels, cfg.num_mixture_dec))
        self.head = nn.Sequential(ELU(), Conv2d(c, out_channels, 3))
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)
            _plain_strides_where_contiguous(self)

    # ------------------------------------------------------------- helpers --
    def stacked_weights(self):
        """Context: every conv weight (normalised) and BatchNorm scale computed once,
        stacked by shape (``hvae.model.bank``); forward and decode open it, and the
        training step opens it around the forward and the regularisers together."""
        return stacked_weights(self)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] image -> padded (black background) [-1, 1] network input."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")
        x = 2.0 * x - 1.0
        if cfg.pad_input:
            x = F.pad(x, (cfg.pad_input,) * 4, value=-1.0)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _output_params(self, state: torch.Tensor) -> torch.Tensor:
        """Post-processing and output head; parameters of the unpadded pixels, float32."""
        params = self.head(self.post(state)).float()
        p = self.config.pad_input
        return params[:, :, p:-p, p:-p] if p else params

    def _temperatures(self, t: float | Sequence[float]) -> list[float]:
        if isinstance(t, (int, float)):
            return [float(t)] * self.num_groups
        t = [float(v) for v in t]
        if len(t) != self.num_groups:
            raise ValueError(f"got {len(t)} temperatures but the model has "
                             f"{self.num_groups} latent groups (pass one per group, top first)")
        return t

    def _encode_bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features per group, top first (the top one after enc0)."""
        h = self.pre(self.stem(x))
        feats = [None] * self.num_groups
        for i in reversed(range(self.num_groups)):
            if i < self.num_groups - 1 and self.group_scale[i] != self.group_scale[i + 1]:
                h = self.enc_down[self.group_scale[i]](h)
            h = self.enc_cells[i](h)
            feats[i] = h
        feats[0] = self.enc0(feats[0])
        return feats

    def _initial_state(self, batch: int) -> torch.Tensor:
        h0 = self.h0.expand(batch, -1, -1, -1)
        return h0.contiguous(memory_format=torch.channels_last) if self.config.channels_last else h0

    def top_down(self, batch: int, enc_feats: list[torch.Tensor] | None = None,
                 latents: Sequence[torch.Tensor] = (), temps: Sequence[float] = (),
                 use_mean: bool = False, analytic_kl: bool = True
                 ) -> tuple[torch.Tensor, list[GroupStats]]:
        """The decoder: one pass over the latent groups, top first.

        With ``enc_feats`` each group draws z from its posterior (the list is
        consumed, so features are freed as soon as they are used); without,
        the leading groups take the given ``latents`` and the others sample
        their prior at ``temps``.  Returns the final state and, for posterior
        passes, each group's tensors.
        """
        state, stats = self._initial_state(batch), []
        for i, group in enumerate(self.groups):
            if enc_feats is not None:
                feature, enc_feats[i] = enc_feats[i], None
                state, group_stats = group(state, feature, use_mean, analytic_kl)
                stats.append(group_stats)
            else:
                state = group.sample(state, temps[i], latents[i] if i < len(latents) else None)
        return state, stats

    # ------------------------------------------------------------- forward --
    def forward(self, x: torch.Tensor, use_mean: bool = False, repeats: int = 1,
                analytic_kl: bool = True) -> NVAEOutput:
        """x in [0, 1], [B, C, H, W].  ``use_mean`` takes each posterior's mean
        instead of a sample (a deterministic pass, e.g. for tests).

        ``repeats`` > 1 runs the bottom-up encoder once and the top-down pass for
        ``repeats`` independent latent samples per image, as for
        ``x.repeat_interleave(repeats, 0)`` (image-major); importance sampling
        uses it to share the encoder's work.  Exact in eval mode, where
        BatchNorm does not depend on the batch.

        ``analytic_kl``: the caller's choice between the closed-form KL and the
        Monte-Carlo estimate (groups with flows always use the latter).
        """
        with self.stacked_weights():
            return self._forward(self._prepare(x), use_mean, repeats, analytic_kl)

    def _forward(self, x: torch.Tensor, use_mean: bool, repeats: int, analytic_kl: bool
                 ) -> NVAEOutput:
        """``forward`` on the prepared input, weights already stacked (what ``--compile full`` compiles)."""
        feats = self._encode_bottom_up(x)
        if repeats > 1:
            feats = [repeat_images(f, repeats) for f in feats]
        state, stats = self.top_down(feats[0].shape[0], enc_feats=feats, use_mean=use_mean,
                                     analytic_kl=analytic_kl)
        params = self._output_params(state)
        return NVAEOutput(
            params=params, spec=self.output_spec,
            kl_per_channel=[g.kl for g in stats],
            log_q_per_channel=[g.log_q for g in stats], log_p_per_channel=[g.log_p for g in stats],
            z=[g.z for g in stats], q_mu=[g.q_mu for g in stats],
            q_log_sigma=[g.q_log_sigma for g in stats], p_mu=[g.p_mu for g in stats],
            p_log_sigma=[g.p_log_sigma for g in stats])

    # -------------------------------------------------- latents and samples --
    def encode(self, x: torch.Tensor, use_mean: bool = False) -> list[torch.Tensor]:
        """Per-group latents z ~ q(z|x) (after any flows), top first; ``use_mean``
        takes the posterior means (then pushed through the flows)."""
        return self.forward(x, use_mean=use_mean).z

    def decode(self, latents: Sequence[torch.Tensor], t: float | Sequence[float] = 1.0,
               output: str = "auto", num: int | None = None, output_t: float = 1.0) -> torch.Tensor:
        """Images in [0, 1] (unpadded) from the leading ``latents`` (top first);
        groups not given are drawn from the prior with sigma scaled by ``t``.

        ``output``: "sample" draws from the output distribution (at ``output_t``),
        "mean" returns its mean, "auto" is NVAE's choice (mean for Bernoulli,
        sample for the logistic mixture).  ``num`` is the batch size when
        ``latents`` is empty.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if len(latents) > self.num_groups:
            raise ValueError(f"got {len(latents)} latent groups, the model has {self.num_groups}")
        temps = self._temperatures(t)
        if latents:
            num = latents[0].shape[0]
        elif num is None:
            raise ValueError("pass num (the batch size) when no latents are given")
        with self.stacked_weights():
            state, _ = self.top_down(num, latents=latents, temps=temps)
            likelihood = Likelihood(self._output_params(state), self.output_spec)
        if output == "auto":
            output = "mean" if self.config.binary else "sample"
        return likelihood.mean() if output == "mean" else likelihood.sample(output_t)

    @torch.no_grad()
    def sample(self, num: int, t: float | Sequence[float] = 1.0, output: str = "auto",
               output_t: float = 1.0) -> torch.Tensor:
        """``num`` images in [0, 1] from the prior (decoder only); ``t`` scales the
        prior sigmas, one float or one value per group (top first)."""
        return self.decode([], t=t, output=output, num=num, output_t=output_t)
