"""Distributions and invertible transforms of the hierarchical VAE.

Every log-probability, KL and log-determinant is computed in at least float32,
even under autocast: low-precision inputs are cast up and the arithmetic runs
inside ``torch.autocast(..., enabled=False)``.  Float64 inputs stay float64, so
tests can check the formulas to high precision.

- ``Normal``: diagonal Gaussian latents; ``Normal.residual`` is the paper's residual
  posterior whose KL uses Equation 2 (exact in the deltas); ``Normal.from_raw`` /
  ``nvae_normal_params`` is NVAE's code: raw outputs soft-clamped, sigma floored at
  0.01 (the model builds its prior, and its posterior from the raw sums, this way).
- ``DiscMixLogistic``: discretized mixture of logistics for 1..8-bit images with
  1 or 3 channels (RGB autoregressive means), normalised exactly.
- ``Bernoulli``: binarised images.
- ``Dequantize``, ``Logit``, ``Sigmoid``, ``Tanh``: bijections returning
  ``(output, log_det)`` with the log-det summed per batch item.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = [
    "LOG_SIGMA_BOUND", "SIGMA_FLOOR", "is_channels_last", "standard_normal_like", "soft_clamp", "soft_clamp5", "nvae_normal_params", "residual_kl", "normal_log_prob", "Normal", "DiscMixLogistic", "Bernoulli",
    "Transform", "Dequantize", "Logit", "Sigmoid", "Tanh",
]

#: Normal's log sigma is softly kept inside [-LOG_SIGMA_BOUND, LOG_SIGMA_BOUND]:
#: wide enough that |log sigma| <= 10 is changed by less than 1e-8, tight enough
#: that sigma**2 and 1/sigma**2 stay finite in float32.
LOG_SIGMA_BOUND = 30.0

_LOG_2PI = math.log(2.0 * math.pi)

#: NVAE adds this to every latent sigma (so its top prior is N(0, 1.01^2)); a
#: floor that keeps 1 / sigma bounded by 100.
SIGMA_FLOOR = 0.01


# ---------------------------------------------------------------- helpers ----
def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cast float16/bfloat16 (and integer) tensors to float32; keep float32/64."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def _full_precision(x: torch.Tensor):
    """A context with autocast off for the device of ``x`` (ops stay in fp32/64)."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _sum_per_item(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first (batch) one: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _num_dims(x: torch.Tensor) -> int:
    """Elements per batch item (the D of a D-dimensional bijection)."""
    return math.prod(x.shape[1:])


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Smoothly limit ``x`` to [-bound, bound], the identity to float precision well inside.

    ``x - softplus(x - bound) + softplus(-bound - x)``: both softplus terms vanish
    for moderate ``x`` (unlike ``bound * tanh(x / bound)``, which shrinks them),
    and the gradient stays in (0, 1] so saturated units can still recover.
    """
    return x - _softplus(x - bound) + _softplus(-bound - x)


def _softplus(y: torch.Tensor) -> torch.Tensor:
    """log(1 + e^y) = max(y, 0) + log(1 + e^-|y|), exact to float precision.

    Written with exp/log because F.softplus and log1p are ~20x slower than exp
    on some CPU builds, and this runs for every latent Normal of every pass.
    """
    return y.clamp(min=0) + torch.log(1 + torch.exp(-y.abs()))


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for both small and large d."""
    return torch.where(d < math.log(2.0),
                       torch.log(-torch.expm1(-d)),
                       torch.log1p(-torch.exp(-d)))


# ----------------------------------------------------------------- Normal ----
def soft_clamp5(x: torch.Tensor) -> torch.Tensor:
    """5 tanh(x / 5): NVAE's stabiliser of raw mu / log sigma outputs, ~identity for |x| < 2."""
    return _SoftClamp5.apply(x)


class _SoftClamp5(torch.autograd.Function):
    """5 tanh(x / 5) keeping only its output for backward (autograd would keep tanh's
    output too, a second tensor of the same size): d/dx = 1 - (y / 5)^2."""

    @staticmethod
    def forward(ctx, x):
        y = 5.0 * torch.tanh(x / 5.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.addcmul(grad, grad * y, y, value=-0.04)  # grad * (1 - (y / 5)^2)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-d tensor laid out channels-last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def standard_normal_like(x: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise of ``x``'s shape, dtype, device and memory layout.

    ``torch.randn_like`` of a channels-last tensor takes the CPU's scalar,
    element-by-element path (about 9x slower than its vectorised fill: 5% of a demo
    step); drawing a contiguous NHWC tensor and viewing it as NCHW keeps the fast
    fill and still matches ``x``'s strides, so the elementwise ops that follow
    do not change layout.
    """
    if is_channels_last(x):
        n, c, h, w = x.shape
        return torch.randn(n, h, w, c, dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    return torch.randn_like(x)


def nvae_normal_params(raw_mu: torch.Tensor, raw_log_sigma: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The effective (mu, log sigma) of NVAE's Normal built from raw network outputs:

        mu = 5 tanh(raw_mu / 5),  sigma = exp(5 tanh(raw_log_sigma / 5)) + SIGMA_FLOOR

    Returned as log sigma = log(exp(clamped) + floor) (a logaddexp, exact and
    stable), so every density, KL and sample downstream uses the true sigma.
    In at least float32.
    """
    raw_mu, raw_log_sigma = at_least_fp32(raw_mu), at_least_fp32(raw_log_sigma)
    with _full_precision(raw_mu):
        return soft_clamp5(raw_mu), _FlooredLogSigma.apply(raw_log_sigma)


class _FlooredLogSigma(torch.autograd.Function):
    """log(exp(5 tanh(r / 5)) + SIGMA_FLOOR), keeping only its output y for backward
    (autograd would keep the clamp's output and a tensor of floors as well):
    with c = log(e^y - floor), dy/dr = (1 - floor e^-y) (1 - (c / 5)^2)."""

    @staticmethod
    def forward(ctx, raw_log_sigma):
        clamped = 5.0 * torch.tanh(raw_log_sigma / 5.0)
        y = torch.logaddexp(clamped, torch.full_like(clamped, math.log(SIGMA_FLOOR)))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        sigma = torch.exp(y)
        clamped = torch.log(sigma - SIGMA_FLOOR)
        return grad * (1.0 - SIGMA_FLOOR / sigma) * (1.0 - (clamped / 5.0) ** 2)


def residual_kl(delta_mu: torch.Tensor, delta_log_sigma: torch.Tensor,
                prior_log_sigma: torch.Tensor) -> torch.Tensor:
    """NVAE's Equation 2, elementwise: KL(N(mu_p + dmu, sigma_p dsigma) || N(mu_p, sigma_p)).

        KL = 0.5 * (dmu / sigma_p)^2 + 0.5 * (dsigma^2 - 1) - log dsigma,  dsigma = exp(r)

    Written in the deltas, it is exact in dmu even when mu_p is large (a
    difference of two nearly equal means would lose it); expm1 keeps the
    dsigma term accurate when r is tiny.  Computed in at least float32.
    """
    d, r = at_least_fp32(delta_mu), at_least_fp32(delta_log_sigma)
    ls_p = at_least_fp32(prior_log_sigma)
    with _full_precision(d):
        u = d * torch.exp(-ls_p)
        return torch.addcmul(0.5 * torch.expm1(2.0 * r) - r, u, u, value=0.5)


def normal_log_prob(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, exp(log_sigma)), in at least float32."""
    z, mu, log_sigma = at_least_fp32(z), at_least_fp32(mu), at_least_fp32(log_sigma)
    with _full_precision(z):
        u = (z - mu) * torch.exp(-log_sigma)
        return torch.addcmul(-0.5 * _LOG_2PI - log_sigma, u, u, value=-0.5)


class Normal:
    """Diagonal Gaussian N(mu, sigma), parameterised by log sigma.

    Why the parameterisation: log sigma is unconstrained (a network output) and
    gives the KL and log-density without dividing by a tiny sigma.  The given
    ``log_sigma`` passes through ``soft_clamp(., LOG_SIGMA_BOUND)`` (moves
    |log sigma| <= 10 by < 3e-9) so ``.sigma`` never over/underflows.

    Parameters are stored in at least float32.  All methods are elementwise.
    The model itself works on tensors (``residual_kl``, ``normal_log_prob``);
    this class is for users and tests.
    """

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor,
                 bound: float = LOG_SIGMA_BOUND):
        mu, log_sigma = at_least_fp32(mu), at_least_fp32(log_sigma)
        with _full_precision(mu):
            self.log_sigma = soft_clamp(log_sigma, bound)
        self.mu = mu

    @classmethod
    def residual(cls, prior: "Normal", delta_mu: torch.Tensor,
                 delta_log_sigma: torch.Tensor,
                 bound: float = LOG_SIGMA_BOUND) -> "Normal":
        """NVAE's residual posterior q = N(mu_p + dmu, sigma_p * exp(dlog_sigma)).

        ``delta_log_sigma`` is soft-clamped like a log sigma.  Its KL to the
        prior is ``residual_kl(dmu, dlog_sigma, prior.log_sigma)`` (exact in the
        deltas); ``q.kl(prior)`` gives the same value from the differences.
        """
        delta_mu, delta_log_sigma = at_least_fp32(delta_mu), at_least_fp32(delta_log_sigma)
        with _full_precision(delta_mu):
            q = cls.__new__(cls)
            q.mu = prior.mu + delta_mu
            q.log_sigma = prior.log_sigma + soft_clamp(delta_log_sigma, bound)
        return q

    @classmethod
    def from_raw(cls, raw_mu: torch.Tensor, raw_log_sigma: torch.Tensor) -> "Normal":
        """NVAE's Normal of raw network outputs (``nvae_normal_params``, which the
        model's latent groups call directly); NVAE's residual posterior is
        ``from_raw`` of the sums of raw prior and raw delta outputs."""
        q = cls.__new__(cls)
        q.mu, q.log_sigma = nvae_normal_params(raw_mu, raw_log_sigma)
        return q

    @property
    def sigma(self) -> torch.Tensor:
        return torch.exp(self.log_sigma)

    def sample(self, t: float = 1.0) -> torch.Tensor:
        """Reparameterised sample mu + t * sigma * eps; t < 1 is a colder sample."""
        eps = standard_normal_like(self.mu)
        return self.mu + (t * self.sigma) * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Elementwise log N(z; mu, sigma)."""
        return normal_log_prob(z, self.mu, self.log_sigma)

    def entropy(self) -> torch.Tensor:
        """Elementwise differential entropy 0.5 * log(2 pi e) + log sigma."""
        return 0.5 + 0.5 * _LOG_2PI + self.log_sigma

    def kl(self, other: "Normal") -> torch.Tensor:
        """Elementwise KL(self || other) in closed form: Equation 2 with
        dmu = mu - mu_o and log dsigma = log sigma - log sigma_o."""
        with _full_precision(self.mu):
            return residual_kl(self.mu - other.mu, self.log_sigma - other.log_sigma,
                               other.log_sigma)


# -------------------------------------------------------- DiscMixLogistic ----
class DiscMixLogistic:
    """Discretized mixture of logistics over 2**num_bits values per channel.

    Why: the likelihood of 8- or 5-bit images must be a proper discrete
    distribution, so bits/dim are honest.  Value k of a channel is the bin
    centre 2k / (2**bits - 1) - 1 in [-1, 1]; its probability is the logistic
    mass of [centre - h, centre + h] with h = 1 / (2**bits - 1), except that the
    lowest bin (k == 0) takes all mass below its upper edge and the highest
    (k == 2**bits - 1) all mass above its lower edge, decided by the integer
    index, so the probabilities of each pixel sum to exactly 1.

    ``params`` has shape [B, num_params(C, M), H, W] with M mixture components:

    - C == 1: ``[logits (M) | means (M) | log_scales (M)]``
    - C == 3: ``[logits (M) | means (3M) | log_scales (3M) | coeffs (3M)]`` where
      each 3M block is channel-major (index c * M + m, c = R, G, B) and the
      coeffs block holds (alpha, beta, gamma) the same way; through tanh they
      give the PixelCNN++ autoregressive means
      mu_G + alpha * x_R and mu_B + beta * x_R + gamma * x_G.

    ``channels`` may be left out where the count decides it (30 = 3 * 10 =
    10 * 3 does not: pass it).  Log-scales are clamped to [-7, 7] so the
    standardised edges stay finite: e^-7 is a quarter of an 8-bit half-bin, and
    at e^7 a component is flat over [-1, 1] to float precision.
    """

    LOG_SCALE_MIN = -7.0
    LOG_SCALE_MAX = 7.0

    def __init__(self, params: torch.Tensor, num_bits: int = 8, channels: int | None = None):
        if not 1 <= num_bits <= 8:
            raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
        p = params.shape[1]
        if channels is None:  # infer from the parameter count where unambiguous
            fits = [c for c in (1, 3) if p % self.num_params(c, 1) == 0]
            if len(fits) != 1:
                raise ValueError(f"params has {p} channels: pass channels=1 or 3")
            channels = fits[0]
        per_mix = self.num_params(channels, 1)
        if p % per_mix != 0 or p == 0:
            raise ValueError(f"params has {p} channels, not a multiple of {per_mix} "
                             f"for a {channels}-channel image")
        self.channels = channels
        self.num_mix = p // per_mix
        self.num_bits = num_bits
        self.num_values = 2 ** num_bits
        self.params = at_least_fp32(params)

    @staticmethod
    def num_params(channels: int, num_mix: int) -> int:
        """Network output channels for an image with ``channels`` channels."""
        if channels == 1:
            return 3 * num_mix
        if channels == 3:
            return 10 * num_mix
        raise ValueError(f"DiscMixLogistic supports 1 or 3 channels, got {channels}")

    # -- parameter views ------------------------------------------------------
    def _split(self):
        """logits [B,M,H,W]; means, log_scales, coeffs [B,C,M,H,W] (coeffs tanh'd)."""
        b, _, h, w = self.params.shape
        m, c = self.num_mix, self.channels
        logits = self.params[:, :m]
        means = self.params[:, m:m + c * m].reshape(b, c, m, h, w)
        log_scales = self.params[:, m + c * m:m + 2 * c * m].reshape(b, c, m, h, w)
        log_scales = log_scales.clamp(self.LOG_SCALE_MIN, self.LOG_SCALE_MAX)
        coeffs = None
        if c == 3:
            coeffs = torch.tanh(self.params[:, m + 6 * m:].reshape(b, 3, m, h, w))
        return logits, means, log_scales, coeffs

    def _ar_means(self, means, coeffs, x):
        """Means of G and B shifted by the (already known) R and G values x [B,C,H,W]."""
        if self.channels == 1:
            return means
        xr, xg = x[:, 0:1], x[:, 1:2]  # [B,1,H,W] broadcast over M
        mr = means[:, 0]
        mg = means[:, 1] + coeffs[:, 0] * xr
        mb = means[:, 2] + coeffs[:, 1] * xr + coeffs[:, 2] * xg
        return torch.stack([mr, mg, mb], dim=1)

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        """Integer bin index of values in [-1, 1] (nearest bin, clamped)."""
        k = torch.round((x + 1.0) * (0.5 * (self.num_values - 1)))
        return k.clamp(0, self.num_values - 1)

    def _centre(self, k: torch.Tensor) -> torch.Tensor:
        return k * (2.0 / (self.num_values - 1)) - 1.0

    # -- likelihood -----------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log P(x) per image, [B]; x [B, C, H, W] on the bin centres in [-1, 1]."""
        x = at_least_fp32(x).to(self.params.dtype)
        with _full_precision(x):
            logits, means, log_scales, coeffs = self._split()
            k = self._index(x)                       # [B,C,H,W]
            centre = self._centre(k)
            means = self._ar_means(means, coeffs, centre)   # [B,C,M,H,W]
            inv_s = torch.exp(-log_scales)
            half = 1.0 / (self.num_values - 1)
            kk, cc = k.unsqueeze(2), centre.unsqueeze(2)
            a = (cc - half - means) * inv_s          # standardised lower edge
            b = (cc + half - means) * inv_s          # standardised upper edge
            # Interior bin: log(sigmoid(b) - sigmoid(a))
            #   = logsigmoid(b) + logsigmoid(-a) + log(1 - exp(a - b)),
            # using sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a-b)).
            interior = (F.logsigmoid(b) + F.logsigmoid(-a)
                        + _log1mexp((2.0 * half) * inv_s))
            lowest = F.logsigmoid(b)                 # P(X < upper edge)
            highest = F.logsigmoid(-a)               # P(X > lower edge)
            logp = torch.where(kk == 0, lowest,
                               torch.where(kk == self.num_values - 1, highest, interior))
            logp = logp.sum(dim=1)                   # joint over channels: [B,M,H,W]
            logp = torch.logsumexp(logp + F.log_softmax(logits, dim=1), dim=1)
            return _sum_per_item(logp)

    # -- sampling -------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, t: float) -> torch.Tensor:
        """One-hot component choice [B,M,H,W]; Gumbel-max on logits / t (argmax at t=0)."""
        if t > 0:
            u = torch.rand_like(logits).clamp(1e-10, 1.0 - 1e-7)
            logits = logits / t - torch.log(-torch.log(u))
        return F.one_hot(logits.argmax(dim=1), self.num_mix).permute(0, 3, 1, 2).to(logits.dtype)

    @torch.no_grad()
    def sample(self, t: float = 1.0) -> torch.Tensor:
        """Sample [B, C, H, W] on bin centres; t multiplies the logistic scales
        and divides the mixture logits, so t < 1 is less noisy (t = 0: modes).

        Channels are drawn in order, each quantised before it feeds the next
        channel's mean, which is exact ancestral sampling of the discrete model
        (rounding a logistic draw to the nearest bin, clamped, gives exactly the
        bin masses above, edge bins included).
        """
        with _full_precision(self.params):
            logits, means, log_scales, coeffs = self._split()
            sel = self._pick(logits, t).unsqueeze(1)           # [B,1,M,H,W]
            mean = (means * sel).sum(dim=2)                     # [B,C,H,W]
            scale = (torch.exp(log_scales) * sel).sum(dim=2)
            coef = (coeffs * sel).sum(dim=2) if coeffs is not None else None
            u = torch.rand_like(mean).clamp(1e-7, 1.0 - 1e-7)
            noise = t * scale * (torch.log(u) - torch.log1p(-u))
            out = []
            for c in range(self.channels):
                m = mean[:, c]
                if c == 1:
                    m = m + coef[:, 0] * out[0]
                elif c == 2:
                    m = m + coef[:, 1] * out[0] + coef[:, 2] * out[1]
                out.append(self._centre(self._index(m + noise[:, c])))
            return torch.stack(out, dim=1)

    @torch.no_grad()
    def mean(self) -> torch.Tensor:
        """A point estimate [B, C, H, W] on bin centres in [-1, 1].

        Channel by channel: the mixture-weighted mean of the component means,
        with the autoregressive terms fed the previous channels' estimates,
        clamped to [-1, 1] and rounded to the nearest bin centre.
        """
        with _full_precision(self.params):
            logits, means, _, coeffs = self._split()
            w = F.softmax(logits, dim=1)                        # [B,M,H,W]
            out = []
            for c in range(self.channels):
                m = means[:, c]
                if c == 1:
                    m = m + coeffs[:, 0] * out[0].unsqueeze(1)
                elif c == 2:
                    m = m + coeffs[:, 1] * out[0].unsqueeze(1) + coeffs[:, 2] * out[1].unsqueeze(1)
                out.append(self._centre(self._index((w * m).sum(dim=1))))
            return torch.stack(out, dim=1)


# -------------------------------------------------------------- Bernoulli ----
class Bernoulli:
    """Independent Bernoulli pixels from logits, for binarised images.

    Why logits: -BCE-with-logits is the stable log-likelihood.
    """

    def __init__(self, logits: torch.Tensor):
        self.logits = at_least_fp32(logits)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log P(x) per item, [B], for x in {0, 1}."""
        x = at_least_fp32(x).to(self.logits.dtype)
        with _full_precision(x):
            nll = F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")
            return -_sum_per_item(nll)

    @torch.no_grad()
    def sample(self, t: float = 1.0) -> torch.Tensor:
        """Draw {0, 1} pixels; t < 1 sharpens (logits / t), t = 0 thresholds."""
        if t <= 0:
            return (self.logits > 0).to(self.logits.dtype)
        return torch.bernoulli(torch.sigmoid(self.logits / t))

    def mean(self) -> torch.Tensor:
        """Pixel probabilities sigmoid(logits)."""
        return torch.sigmoid(self.logits)


# ------------------------------------------------------------- transforms ----
class Transform:
    """A bijection y = f(x) with ``forward(x) -> (y, log|det df/dx|)`` and
    ``inverse(y) -> (x, log|det df^-1/dy|)``, log-dets summed per item, [B]."""

    def forward(self, x: torch.Tensor):
        raise NotImplementedError

    def inverse(self, y: torch.Tensor):
        raise NotImplementedError

    def __call__(self, x: torch.Tensor):
        return self.forward(x)


class Dequantize(Transform):
    """Integers 0..num_bins-1 -> (x + u) / num_bins in [0, 1), u ~ U[0, 1).

    Why: a continuous density on the dequantized values lower-bounds the
    discrete likelihood; the division contributes -D * log(num_bins).
    """

    def __init__(self, num_bins: int = 256):
        self.num_bins = num_bins

    def forward(self, x: torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        x = at_least_fp32(x.to(dtype))
        u = torch.rand_like(x)
        y = (x + u) / self.num_bins
        # Rounding can reach 1.0 for the top bin; keep the documented [0, 1).
        below_one = torch.nextafter(torch.ones((), dtype=y.dtype), torch.zeros((), dtype=y.dtype))
        y = torch.minimum(y, below_one.to(y.device))
        log_det = torch.full((x.shape[0],), -_num_dims(x) * math.log(self.num_bins),
                             dtype=y.dtype, device=y.device)
        return y, log_det

    def inverse(self, y: torch.Tensor):
        """Floor back to integer values (int64), log-det +D * log(num_bins)."""
        x = torch.floor(y * self.num_bins).clamp(0, self.num_bins - 1).long()
        log_det = torch.full((y.shape[0],), _num_dims(y) * math.log(self.num_bins),
                             dtype=at_least_fp32(y).dtype, device=y.device)
        return x, log_det


class Logit(Transform):
    """(0, 1) -> reals: y = logit(alpha / 2 + (1 - alpha) x).

    Why the alpha squeeze: keeps dequantized pixels away from 0 and 1 where the
    logit is infinite.  log_det = D log(1 - alpha) - sum(log s + log(1 - s)).
    """

    def __init__(self, alpha: float = 1e-5):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def forward(self, x: torch.Tensor):
        x = at_least_fp32(x)
        with _full_precision(x):
            s = 0.5 * self.alpha + (1.0 - self.alpha) * x
            log_s, log_1ms = torch.log(s), torch.log1p(-s)
            y = log_s - log_1ms
            log_det = _num_dims(x) * math.log1p(-self.alpha) - _sum_per_item(log_s + log_1ms)
            return y, log_det

    def inverse(self, y: torch.Tensor):
        y = at_least_fp32(y)
        with _full_precision(y):
            s = torch.sigmoid(y)
            x = (s - 0.5 * self.alpha) / (1.0 - self.alpha)
            log_det = (_sum_per_item(F.logsigmoid(y) + F.logsigmoid(-y))
                       - _num_dims(y) * math.log1p(-self.alpha))
            return x, log_det


class Sigmoid(Transform):
    """Reals -> (0, 1): y = sigmoid(x), log_det = sum(-x - 2 softplus(-x)).

    Why: maps a flow's output back to pixel space; the plain inverse of Logit(0).
    """

    def forward(self, x: torch.Tensor):
        x = at_least_fp32(x)
        with _full_precision(x):
            return torch.sigmoid(x), _sum_per_item(-x - 2.0 * F.softplus(-x))

    def inverse(self, y: torch.Tensor):
        y = at_least_fp32(y)
        with _full_precision(y):
            log_y, log_1my = torch.log(y), torch.log1p(-y)
            return log_y - log_1my, -_sum_per_item(log_y + log_1my)


class Tanh(Transform):
    """Reals -> (-1, 1): y = tanh(x), log_det = sum(2 (log 2 - |x| - softplus(-2|x|))).

    Why this form: log(1 - tanh(x)^2) computed directly is -inf once tanh
    rounds to 1 (|x| > ~9 in float32); the softplus form stays exact (tanh'
    is even, so using |x| avoids cancellation for large negative x).
    """

    def forward(self, x: torch.Tensor):
        x = at_least_fp32(x)
        with _full_precision(x):
            ax = x.abs()
            log_det = _sum_per_item(2.0 * (math.log(2.0) - ax - F.softplus(-2.0 * ax)))
            return torch.tanh(x), log_det

    def inverse(self, y: torch.Tensor):
        """atanh, with y clamped just inside (-1, 1) so the result stays finite."""
        y = at_least_fp32(y)
        with _full_precision(y):
            eps = torch.finfo(y.dtype).eps
            y = y.clamp(-1.0 + eps, 1.0 - eps)
            return torch.atanh(y), -_sum_per_item(torch.log1p(-y) + torch.log1p(y))
