"""The NVAE tower (Vahdat & Kautz, 2020): bottom-up encoder, top-down decoder
with a residual-Normal posterior per latent group, optional IAF cells.

    x -> pad, 2x-1 -> stem -> pre-processing blocks -> encoder tower (finest
    scale first; the feature after each group's cells is kept) -> ELU-Conv-ELU
    for the top group.

    learned h0 -> for each group i (top first):
        [i > 0] decoder cells; prior p_i = ELU-Conv1x1(state)
        posterior q_i = N(mu_p + dmu, sigma_p * dsigma) from
                        Conv3x3(encoder feature + Conv1x1(decoder state))
        z ~ q_i -> IAF cells (conditioned on that feature) -> state = Conv1x1([state, z])
        (an up-sampling cell between scales)
    -> post-processing blocks -> ELU-Conv3x3 -> Bernoulli logits or DML params.

Latent groups are indexed top (coarsest) first everywhere.  Sampling runs the
decoder alone.  Distributions are built in float32 even under autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hvae.config import Config
from hvae.distributions import Bernoulli, DiscMixLogistic, Normal
from hvae.model.cells import ELU, Conv2d, DecCell, DecCombiner, EncCell, EncCombiner
from hvae.model.flows import IAFFlow

DEC_EXPAND = 6    # mbconv expansion in the decoder tower
POST_EXPAND = 3   # ... and in the post-processing blocks
OUTPUTS = ("auto", "sample", "mean")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    """Keep raw mu / log sigma outputs in (-5, 5) (NVAE's stabiliser); ~identity for |x| < 2."""
    return 5.0 * torch.tanh(x / 5.0)


def _normal_params(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, log_sigma = _soft_clamp5(raw.float()).chunk(2, dim=1)
    return mu, log_sigma


class Likelihood:
    """The output distribution over the real (unpadded) pixels.

    Takes and returns images in [0, 1] (the data's space): ``log_prob(x)`` maps
    x to the distribution's space itself (2x - 1 for the logistic mixture,
    unchanged for Bernoulli), so callers pass the same x given to the model.
    """

    def __init__(self, dist, binary: bool):
        self.dist = dist
        self.binary = binary

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per image, [B], in nats."""
        return self.dist.log_prob(x if self.binary else 2.0 * x - 1.0)

    def _to_unit(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.binary else (y + 1.0) * 0.5

    def sample(self, t: float = 1.0) -> torch.Tensor:
        return self._to_unit(self.dist.sample(t))

    def mean(self) -> torch.Tensor:
        return self._to_unit(self.dist.mean())


@dataclass
class NVAEOutput:
    """Everything the objectives and evaluation need from one forward pass.

    Lists have one entry per latent group, top group first.
    """
    likelihood: Likelihood
    kl: list[torch.Tensor]              # [B]: analytic KL, or log q - log p (flows / kl_mc)
    kl_per_channel: list[torch.Tensor]  # [B, L], summed over positions
    log_q: list[torch.Tensor]           # [B]: log q(z|x) of the sample, incl. flow log-dets
    log_p: list[torch.Tensor]           # [B]: log p(z) of the sample
    z: list[torch.Tensor]               # the samples (after the flows)
    posteriors: list[Normal]            # q before the flows
    priors: list[Normal]

    @property
    def q_mu(self): return [q.mu for q in self.posteriors]          # posterior (before flows) mean per group, [B, L, h, w]
    @property
    def q_log_sigma(self): return [q.log_sigma for q in self.posteriors]
    @property
    def p_mu(self): return [p.mu for p in self.priors]
    @property
    def p_log_sigma(self): return [p.log_sigma for p in self.priors]


class LatentGroup(nn.Module):
    """One latent group of the top-down pass: decoder cells, prior, posterior, combiner.

    The top group has no decoder cells, a fixed N(0, 1) prior and takes its
    posterior from the encoder alone.
    """

    def __init__(self, cfg: Config, c_enc: int, c_dec: int, top: bool):
        super().__init__()
        L = cfg.num_latent_per_group
        self.top = top
        if not top:
            self.dec_cells = nn.Sequential(*[DecCell(c_dec, DEC_EXPAND, cfg.use_se)
                                             for _ in range(cfg.num_cell_per_cond_dec)])
            self.prior = nn.Sequential(ELU(), Conv2d(c_dec, 2 * L, 1))
            self.enc_combiner = EncCombiner(c_enc, c_dec)
        self.posterior = Conv2d(c_enc, 2 * L, 3)
        self.flow = IAFFlow(L, c_enc, cfg.num_nf) if cfg.num_nf > 0 else None
        self.combiner = DecCombiner(c_dec, L)


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
        self.group_scale = [s for s, g in enumerate(groups) for _ in range(g)]
        self.num_groups = len(self.group_scale)
        top_size = cfg.padded_size // cfg.downsample_factor
        c_enc = [cfg.num_channels_enc * 2 ** (P + S - 1 - s) for s in range(S)]
        c_dec = [cfg.num_channels_dec * 2 ** (P + S - 1 - s) for s in range(S)]
        self.latent_shapes = [(L, top_size * 2 ** s, top_size * 2 ** s) for s in self.group_scale]
        self.data_dims = cfg.in_channels * cfg.image_size ** 2
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
        # down-sampling cell into each coarser scale (enc_down[s] feeds scale s).
        self.enc_cells = nn.ModuleList(
            nn.Sequential(*[EncCell(c_enc[s], use_se) for _ in range(cfg.num_cell_per_cond_enc)])
            for s in self.group_scale)
        self.enc_down = nn.ModuleList(EncCell(c_enc[s + 1], use_se, down=True) for s in range(S - 1))
        self.enc0 = nn.Sequential(ELU(), Conv2d(c_enc[0], c_enc[0], 1), ELU())

        # Top-down: learned initial feature, latent groups, up-sampling cells
        # (dec_up[s] leaves scale s).
        self.h0 = nn.Parameter(torch.rand(1, c_dec[0], top_size, top_size))
        self.groups = nn.ModuleList(LatentGroup(cfg, c_enc[s], c_dec[s], top=i == 0)
                                    for i, s in enumerate(self.group_scale))
        self.dec_up = nn.ModuleList(DecCell(c_dec[s], DEC_EXPAND, use_se, up=True)
                                    for s in range(S - 1))
        post, c = [], c_dec[-1]
        for _ in range(cfg.num_postprocess_blocks):
            post.append(DecCell(c, POST_EXPAND, use_se, up=True))
            c //= 2
            post += [DecCell(c, POST_EXPAND, use_se) for _ in range(cfg.num_postprocess_cells - 1)]
        self.post = nn.Sequential(*post)
        out_channels = (cfg.in_channels if cfg.binary
                        else DiscMixLogistic.num_params(cfg.in_channels, cfg.num_mixture_dec))
        self.head = nn.Sequential(ELU(), Conv2d(c, out_channels, 3))
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------- helpers --
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

    def _likelihood(self, s: torch.Tensor) -> Likelihood:
        """Post-processing and output head; the distribution covers the unpadded pixels."""
        params = self.head(self.post(s)).float()
        p = self.config.pad_input
        if p:
            params = params[:, :, p:-p, p:-p]
        if self.config.binary:
            return Likelihood(Bernoulli(params), binary=True)
        return Likelihood(DiscMixLogistic(params, self.config.num_x_bits,
                                          channels=self.config.in_channels), binary=False)

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
        s = self.pre(self.stem(x))
        feats = [None] * self.num_groups
        for i in reversed(range(self.num_groups)):
            if i < self.num_groups - 1 and self.group_scale[i] != self.group_scale[i + 1]:
                s = self.enc_down[self.group_scale[i]](s)
            s = self.enc_cells[i](s)
            feats[i] = s
        feats[0] = self.enc0(feats[0])
        return feats

    def _decoder_state(self, i: int, s: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The decoder state entering group i (before its combiner)."""
        if i == 0:
            h0 = self.h0.expand(batch, -1, -1, -1)
            return h0.contiguous(memory_format=torch.channels_last) if self.config.channels_last else h0
        if self.group_scale[i] != self.group_scale[i - 1]:
            s = self.dec_up[self.group_scale[i - 1]](s)
        return self.groups[i].dec_cells(s)

    def _prior(self, i: int, s: torch.Tensor) -> Normal:
        if i == 0:
            zeros = s.new_zeros((s.shape[0], *self.latent_shapes[0]), dtype=torch.float32)
            return Normal(zeros, zeros)
        return Normal(*_normal_params(self.groups[i].prior(s)))

    # ------------------------------------------------------------- forward --
    def forward(self, x: torch.Tensor, use_mean: bool = False, repeats: int = 1) -> NVAEOutput:
        """x in [0, 1], [B, C, H, W].  ``use_mean`` takes each posterior's mean
        instead of a sample (a deterministic pass, e.g. for tests).

        ``repeats`` > 1 runs the bottom-up encoder once and the top-down pass for
        ``repeats`` independent latent samples per image, as for
        ``x.repeat_interleave(repeats, 0)`` (image-major); importance sampling
        uses it to share the encoder's work.  Exact in eval mode, where
        BatchNorm does not depend on the batch.
        """
        cfg = self.config
        feats = self._encode_bottom_up(self._prepare(x))
        if repeats > 1:
            feats = [f.repeat_interleave(repeats, dim=0) for f in feats]
            x = x.repeat_interleave(repeats, dim=0)
        analytic = cfg.num_nf == 0 and not cfg.kl_mc
        out = NVAEOutput(None, [], [], [], [], [], [], [])
        s = None
        for i, group in enumerate(self.groups):
            s = self._decoder_state(i, s, x.shape[0])
            prior = self._prior(i, s)
            context = feats[i] if i == 0 else group.enc_combiner(feats[i], s)
            feats[i] = None
            dmu, dlog_sigma = _normal_params(group.posterior(context))
            if i > 0 and cfg.res_dist:
                q = Normal.residual(prior, dmu, dlog_sigma)
            else:
                q = Normal(dmu, dlog_sigma)
            # z = mu + sigma * eps, so log q(z) = -eps^2 / 2 - log sigma - log(2 pi) / 2
            # needs no (z - mu) / sigma and keeps no extra tensors for backward.
            log_q = -q.log_sigma - HALF_LOG_2PI
            if use_mean:
                z = q.mu
            else:
                eps = torch.randn_like(q.mu)
                z = q.mu + q.sigma * eps
                log_q = log_q - 0.5 * eps * eps
            log_q = log_q.sum(dim=(2, 3))                                # [B, L]
            if group.flow is not None:
                z, log_det = group.flow(z, context)                      # log_det [B, L]
                log_q = log_q - log_det
            # log q / log p carry gradients only where they form the KL.
            with torch.set_grad_enabled(torch.is_grad_enabled() and not analytic):
                log_p = prior.log_prob(z).sum(dim=(2, 3))
            if analytic:
                kl, log_q = q.kl(prior).sum(dim=(2, 3)), log_q.detach()
            else:
                kl = log_q - log_p
            out.kl.append(kl.sum(dim=1))
            out.kl_per_channel.append(kl)
            out.log_q.append(log_q.sum(dim=1))
            out.log_p.append(log_p.sum(dim=1))
            out.z.append(z)
            out.posteriors.append(q)
            out.priors.append(prior)
            s = group.combiner(s, z)
        out.likelihood = self._likelihood(s)
        return out

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
        s = None
        for i, group in enumerate(self.groups):
            s = self._decoder_state(i, s, num)
            z = latents[i] if i < len(latents) else self._prior(i, s).sample(temps[i])
            s = group.combiner(s, z)
        lik = self._likelihood(s)
        if output == "auto":
            output = "mean" if self.config.binary else "sample"
        return lik.mean() if output == "mean" else lik.sample(output_t)

    @torch.no_grad()
    def sample(self, num: int, t: float | Sequence[float] = 1.0, output: str = "auto",
               output_t: float = 1.0) -> torch.Tensor:
        """``num`` images in [0, 1] from the prior (decoder only); ``t`` scales the
        prior sigmas, one float or one value per group (top first)."""
        return self.decode([], t=t, output=output, num=num, output_t=output_t)
