"""Tests of hvae.distributions: each check is against an independent formula."""
import itertools
import math

import pytest
import torch
import torch.distributions as td

from hvae.distributions import (SIGMA_FLOOR, Bernoulli, Dequantize, DiscMixLogistic, Logit, Normal,
                                Sigmoid, Tanh, nvae_normal_params, residual_kl, soft_clamp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rand_normal_params(n, dtype=torch.float64, extreme=False):
    g = torch.Generator().manual_seed(1)
    if extreme:
        ls = torch.linspace(-10, 10, n, dtype=dtype)
        mu = torch.linspace(-30, 30, n, dtype=dtype)[torch.randperm(n, generator=g)]
    else:
        ls = torch.randn(n, dtype=dtype, generator=g)
        mu = 3 * torch.randn(n, dtype=dtype, generator=g)
    return mu, ls


# ------------------------------------------------------------------ Normal ----
def test_soft_clamp_is_identity_for_moderate_values_and_bounded():
    x = torch.linspace(-10, 10, 101, dtype=torch.float64)
    assert torch.allclose(soft_clamp(x, 30.0), x, atol=1e-8, rtol=0)
    big = soft_clamp(torch.tensor([-1e4, 1e4], dtype=torch.float64), 30.0)
    assert torch.allclose(big, torch.tensor([-30.0, 30.0], dtype=torch.float64))
    n = Normal(torch.zeros(2), torch.tensor([-1e3, 1e3]))
    assert torch.isfinite(n.sigma).all() and (n.sigma > 0).all()
    assert torch.isfinite(n.kl(Normal(torch.zeros(2), torch.zeros(2)))).all()


def test_nvae_normal_is_clamped_with_a_sigma_floor():
    """NVAE's Normal of raw outputs: mu = 5 tanh(mu/5), sigma = exp(5 tanh(ls/5)) + 0.01,
    written out here; log sigma is that of the floored sigma (not the clamped raw value)."""
    raw_mu = torch.linspace(-40, 40, 201, dtype=torch.float64)
    raw_ls = torch.linspace(-40, 40, 201, dtype=torch.float64).flip(0)
    mu, log_sigma = nvae_normal_params(raw_mu, raw_ls)
    torch.testing.assert_close(mu, 5 * torch.tanh(raw_mu / 5), rtol=1e-12, atol=1e-12)
    sigma = torch.exp(5 * torch.tanh(raw_ls / 5)) + SIGMA_FLOOR
    torch.testing.assert_close(log_sigma, torch.log(sigma), rtol=1e-12, atol=1e-12)
    assert mu.dtype == torch.float64 and log_sigma.min() > math.log(SIGMA_FLOOR)
    top = nvae_normal_params(torch.zeros(1), torch.zeros(1))[1]  # raw (0, 0): NVAE's top prior
    torch.testing.assert_close(top, torch.tensor([math.log(1.01)]))
    q = Normal.from_raw(raw_mu, raw_ls)
    z = torch.randn(201, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), td.Normal(mu, sigma).log_prob(z), rtol=1e-10, atol=1e-10)
    p = Normal.from_raw(raw_mu.roll(5), raw_ls.roll(9))
    ref = td.kl_divergence(td.Normal(q.mu, q.sigma), td.Normal(p.mu, p.sigma))
    torch.testing.assert_close(q.kl(p), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("extreme", [False, True])
def test_normal_kl_matches_torch(extreme):
    mu1, ls1 = _rand_normal_params(400, extreme=extreme)
    mu2, ls2 = _rand_normal_params(400, extreme=extreme)
    ls2, mu2 = ls2.flip(0), mu2.roll(7)  # pair small with large log sigma
    p, q = Normal(mu1, ls1), Normal(mu2, ls2)
    ref = td.kl_divergence(td.Normal(mu1, ls1.exp()), td.Normal(mu2, ls2.exp()))
    out = p.kl(q)
    assert out.dtype == torch.float64 and out.shape == mu1.shape
    # rtol 1e-7: the soft clamp moves log sigma = +-10 by ~2e-9
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)


def test_normal_kl_with_itself_is_zero():
    mu, ls = _rand_normal_params(100, dtype=torch.float32, extreme=True)
    p = Normal(mu, ls)
    assert p.kl(p).abs().max() == 0
    assert p.kl(Normal(mu.clone(), ls.clone())).abs().max() == 0


def _eq2(dmu, dls, ls_p):
    """NVAE Eq. 2 written out: 0.5 (dmu^2 / sigma_p^2 + dsigma^2) - 0.5 - log dsigma."""
    dsigma = torch.exp(dls)
    sigma_p = torch.exp(ls_p)
    return 0.5 * (dmu ** 2 / sigma_p ** 2 + dsigma ** 2) - 0.5 - torch.log(dsigma)


def test_residual_normal_parameters_and_eq2_kl():
    mu_p, ls_p = _rand_normal_params(300, extreme=True)
    dmu, dls = torch.randn(300, dtype=torch.float64), 2 * torch.randn(300, dtype=torch.float64)
    prior = Normal(mu_p, ls_p)
    q = Normal.residual(prior, dmu, dls)
    torch.testing.assert_close(q.mu, mu_p + dmu)
    torch.testing.assert_close(q.sigma, ls_p.exp() * dls.exp())
    # prior.log_sigma: the effective value (the soft clamp moves +-10 by ~2e-9)
    torch.testing.assert_close(q.kl(prior), _eq2(dmu, dls, prior.log_sigma), rtol=1e-9, atol=1e-9)
    ref = td.kl_divergence(td.Normal(mu_p + dmu, (ls_p + dls).exp()), td.Normal(mu_p, ls_p.exp()))
    torch.testing.assert_close(q.kl(prior), ref, rtol=1e-7, atol=1e-8)


def test_residual_kl_uses_deltas_in_float32():
    # A large prior mean and a tiny shift: mu_q - mu_p loses the shift in float32,
    # Eq. 2 on the stored deltas does not.
    mu_p = torch.full((5,), 1000.0)
    ls_p = torch.zeros(5)
    dmu = torch.tensor([1e-3, -2e-3, 3e-4, 0.0, 1e-2])
    dls = torch.tensor([1e-4, 0.0, -1e-4, 1e-5, 0.0])
    ref = _eq2(dmu.double(), dls.double(), ls_p.double())
    torch.testing.assert_close(residual_kl(dmu, dls, ls_p).double(), ref, rtol=1e-4, atol=1e-12)


def test_normal_log_prob_entropy_match_torch():
    mu, ls = _rand_normal_params(200, extreme=True)
    z = mu + torch.randn_like(mu) * 3
    ref = td.Normal(mu, ls.exp())
    torch.testing.assert_close(Normal(mu, ls).log_prob(z), ref.log_prob(z), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(Normal(mu, ls).entropy(), ref.entropy(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("t", [1.0, 0.5, 0.1])
def test_normal_sample_moments_scale_with_t(t):
    n = 200_000
    p = Normal(torch.full((n,), 1.5), torch.full((n,), math.log(2.0)))
    z = p.sample(t)
    assert abs(z.mean().item() - 1.5) < 0.02
    assert abs(z.std().item() - 2.0 * t) < 0.02 * t


def test_normal_sample_at_t0_is_the_mean():
    mu, ls = torch.randn(1000), torch.randn(1000)
    z = Normal(mu, ls).sample(0.0)
    assert torch.equal(z, mu)  # t multiplies sigma: no division by t, no NaN


def test_normal_sample_is_reparameterised():
    mu = torch.zeros(10, requires_grad=True)
    ls = torch.zeros(10, requires_grad=True)
    Normal(mu, ls).sample().sum().backward()
    assert torch.allclose(mu.grad, torch.ones(10)) and ls.grad.abs().sum() > 0


def test_normal_float32_under_autocast():
    mu, ls = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, q = Normal(mu, ls), Normal(torch.zeros_like(mu), torch.zeros_like(ls))
        r = Normal.residual(q, mu, ls)
        outs = [p.log_prob(mu), p.kl(q), r.kl(q), p.entropy()]
    assert all(o.dtype == torch.float32 for o in outs)
    ref = td.kl_divergence(td.Normal(mu.float(), ls.float().exp()), td.Normal(0.0, 1.0))
    torch.testing.assert_close(outs[1], ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------- DiscMixLogistic ----
def _dml_params(channels, num_mix, mean_scale=1.0, ls_low=-4.0, ls_high=0.0, seed=0,
                dtype=torch.float32):
    """Random params [1, P, 1, 1] in the documented layout."""
    g = torch.Generator().manual_seed(seed)
    c, m = channels, num_mix
    logits = 2 * torch.randn(m, generator=g)
    means = mean_scale * (2 * torch.rand(c * m, generator=g) - 1)
    ls = ls_low + (ls_high - ls_low) * torch.rand(c * m, generator=g)
    parts = [logits, means, ls]
    if c == 3:
        parts.append(2 * torch.randn(3 * m, generator=g))
    return torch.cat(parts).to(dtype).view(1, -1, 1, 1)


def _all_values(channels, bits):
    """Every pixel value (every RGB triple) as a batch [K^C, C, 1, 1]."""
    k = 2 ** bits
    centres = torch.arange(k, dtype=torch.float64) * (2.0 / (k - 1)) - 1
    grid = torch.tensor(list(itertools.product(range(k), repeat=channels)))
    return centres[grid].float().view(-1, channels, 1, 1)


def _total_mass(params, channels, bits):
    x = _all_values(channels, bits)
    dml = DiscMixLogistic(params.expand(x.shape[0], -1, -1, -1), bits, channels=channels)
    lp = dml.log_prob(x)
    assert lp.shape == (x.shape[0],) and torch.isfinite(lp).all()
    return lp.double().exp().sum().item()


def test_dml_num_params():
    assert DiscMixLogistic.num_params(1, 10) == 30
    assert DiscMixLogistic.num_params(3, 10) == 100
    d = DiscMixLogistic(torch.zeros(2, 100, 4, 4))
    assert d.channels == 3 and d.num_mix == 10
    with pytest.raises(ValueError):
        DiscMixLogistic(torch.zeros(2, 30, 4, 4))  # ambiguous: 1 x 10 or 3 x 3
    assert DiscMixLogistic(torch.zeros(2, 30, 4, 4), channels=1).num_mix == 10


@pytest.mark.parametrize("bits", [1, 5, 8])
@pytest.mark.parametrize("case", ["random", "far_means", "tiny_scales", "huge_scales"])
def test_dml_one_channel_sums_to_one(bits, case):
    kw = {"random": {}, "far_means": dict(mean_scale=50.0),
          "tiny_scales": dict(ls_low=-20.0, ls_high=-7.0),
          "huge_scales": dict(ls_low=5.0, ls_high=20.0)}[case]
    for seed in range(3):
        assert abs(_total_mass(_dml_params(1, 5, seed=seed, **kw), 1, bits) - 1) < 1e-4


@pytest.mark.parametrize("case", ["random", "far_means", "tiny_scales", "huge_scales"])
def test_dml_rgb_3bit_joint_sums_to_one(case):
    kw = {"random": {}, "far_means": dict(mean_scale=50.0),
          "tiny_scales": dict(ls_low=-20.0, ls_high=-7.0),
          "huge_scales": dict(ls_low=5.0, ls_high=20.0)}[case]
    for seed in range(2):
        assert abs(_total_mass(_dml_params(3, 4, seed=seed, **kw), 3, 3) - 1) < 1e-4


def test_dml_edge_bins_are_decided_by_index():
    # A component centred on the top bin: only bin K-1 gets the upper tail, so
    # bin K-2 has its plain interval mass (a threshold bug gives it the tail too).
    bits, k = 8, 256
    params = torch.tensor([0.0, 1.0, -3.0], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.tensor([1.0, 1.0 - 2.0 / (k - 1)], dtype=torch.float64).view(2, 1, 1, 1)
    lp = DiscMixLogistic(params.expand(2, -1, -1, -1), bits).log_prob(x).exp()
    s, h = math.exp(-3.0), 1.0 / (k - 1)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    top = 1 - sig((1 - h - 1) / s)
    below = sig((1 - h - 1) / s) - sig((1 - 3 * h - 1) / s)
    torch.testing.assert_close(lp, torch.tensor([top, below], dtype=torch.float64))


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_dml_single_logistic_matches_cdf_differences(bits):
    k = 2 ** bits
    mu, log_s = 0.137, -1.3
    params = torch.tensor([0.3, mu, log_s], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.arange(k, dtype=torch.float64) * (2.0 / (k - 1)) - 1
    lp = DiscMixLogistic(params.expand(k, -1, -1, -1), bits).log_prob(x.view(k, 1, 1, 1))
    assert lp.dtype == torch.float64
    cdf = lambda v: torch.sigmoid((v - mu) / math.exp(log_s))  # noqa: E731
    upper = torch.where(torch.arange(k) == k - 1, torch.ones(k, dtype=torch.float64),
                        cdf(x + 1.0 / (k - 1)))
    lower = torch.where(torch.arange(k) == 0, torch.zeros(k, dtype=torch.float64),
                        cdf(x - 1.0 / (k - 1)))
    torch.testing.assert_close(lp, torch.log(upper - lower), rtol=1e-10, atol=1e-10)


def test_dml_rgb_autoregressive_means_match_independent_formula():
    bits, k = 4, 16
    g = torch.Generator().manual_seed(3)
    means = 0.5 * torch.randn(3, generator=g)
    ls = 0.3 * torch.randn(3, generator=g) - 1
    coef = torch.randn(3, generator=g)
    params = torch.cat([torch.zeros(1), means, ls, coef]).double().view(1, 10, 1, 1)
    x = torch.tensor([[-1.0, 0.2, 1.0], [0.6, -0.6, -0.2], [1.0, 1.0, 1.0 - 2 / 15]],
                     dtype=torch.float64)
    x = ((x + 1) * 7.5).round() / 7.5 - 1
    lp = DiscMixLogistic(params.expand(3, -1, -1, -1), bits).log_prob(x.view(3, 3, 1, 1))
    a = torch.tanh(coef.double())
    ref = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        r, gg, b = x[i].tolist()
        mus = [means[0].item(), means[1].item() + a[0].item() * r,
               means[2].item() + a[1].item() * r + a[2].item() * gg]
        for c, v in enumerate((r, gg, b)):
            s = math.exp(ls[c].item())
            up = 1.0 if v > 1 - 1e-9 else 1 / (1 + math.exp(-(v + 1 / 15 - mus[c]) / s))
            lo = 0.0 if v < -1 + 1e-9 else 1 / (1 + math.exp(-(v - 1 / 15 - mus[c]) / s))
            ref[i] += math.log(up - lo)
    torch.testing.assert_close(lp, ref, rtol=1e-9, atol=1e-9)


def test_dml_log_prob_finite_gradients_for_extreme_params():
    for params in [_dml_params(3, 3, mean_scale=80.0, ls_low=-30, ls_high=-10),
                   _dml_params(3, 3, mean_scale=80.0, ls_low=10, ls_high=30),
                   _dml_params(1, 3, mean_scale=1e3, ls_low=-50, ls_high=50) * 3]:
        channels = 3 if params.shape[1] % 10 == 0 else 1
        x = _all_values(channels, 2)
        p = params.expand(x.shape[0], -1, -1, -1).clone().requires_grad_(True)
        lp = DiscMixLogistic(p, 2, channels=channels).log_prob(x)
        lp.sum().backward()
        assert torch.isfinite(lp).all() and torch.isfinite(p.grad).all()


def test_dml_float32_under_autocast():
    params = torch.randn(2, 100, 4, 4).bfloat16()
    x = torch.randint(0, 256, (2, 3, 4, 4)) / 127.5 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = DiscMixLogistic(params).log_prob(x.bfloat16())
    assert lp.dtype == torch.float32 and lp.shape == (2,)


def _is_on_centres(v, bits):
    k = 2 ** bits
    idx = (v + 1) * (k - 1) / 2
    return bool((v >= -1).all() and (v <= 1).all() and ((idx - idx.round()).abs() < 1e-4).all())


def _dml_mode(params, channels, bits):
    """The t = 0 value written out from the documented layout: the component with the
    largest logit, its location per channel (RGB: plus the autoregressive terms of the
    channels already decided), clamped to [-1, 1] and rounded to the nearest bin centre."""
    b, _, h, w = params.shape
    m = params.shape[1] // DiscMixLogistic.num_params(channels, 1)
    k = 2 ** bits - 1
    quantise = lambda v: torch.round((v.clamp(-1, 1) + 1) * k / 2) * 2 / k - 1  # noqa: E731
    best = params[:, :m].argmax(dim=1, keepdim=True)                             # [B,1,H,W]
    pick = lambda block, c: block[:, c * m:(c + 1) * m].gather(1, best)[:, 0]   # noqa: E731
    means = params[:, m:m + channels * m]
    coeffs = torch.tanh(params[:, m + 2 * channels * m:]) if channels == 3 else None
    out = []
    for c in range(channels):
        loc = pick(means, c)
        if c == 1:
            loc = loc + pick(coeffs, 0) * out[0]
        elif c == 2:
            loc = loc + pick(coeffs, 1) * out[0] + pick(coeffs, 2) * out[1]
        out.append(quantise(loc))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("channels,bits", [(1, 1), (1, 5), (3, 8), (3, 3)])
def test_dml_sample_and_mean_on_bin_centres(channels, bits):
    """Samples and means lie on bin centres; t = 0 gives the mode (no division by t);
    lower temperatures stay closer to it."""
    m = 4
    p = torch.randn(16, DiscMixLogistic.num_params(channels, m), 8, 8) * 3
    d = DiscMixLogistic(p, bits, channels=channels)
    samples = {}
    for t in (1.0, 0.3, 0.0):
        samples[t] = s = d.sample(t)
        assert s.shape == (16, channels, 8, 8) and _is_on_centres(s, bits)
    torch.testing.assert_close(samples[0.0], _dml_mode(p, channels, bits), rtol=0, atol=1e-5)
    assert torch.equal(d.sample(0.0), samples[0.0])  # no noise left at t = 0
    spread = [(samples[t] - samples[0.0]).abs().mean().item() for t in (0.3, 1.0)]
    assert 0 < spread[0] < spread[1], spread
    mean = d.mean()
    assert mean.shape == (16, channels, 8, 8) and _is_on_centres(mean, bits)


def test_dml_mean_of_sharp_component_and_far_means():
    # M = 2: logits (5, -5), means (0.3, -0.7), log-scales (-6, -6).
    p = torch.tensor([5.0, -5.0, 0.3, -0.7, -6.0, -6.0]).view(1, 6, 1, 1)
    mean = DiscMixLogistic(p, 8).mean().item()
    assert abs(mean - 0.3) <= 1 / 255 + 1e-6 and _is_on_centres(torch.tensor(mean), 8)
    far = torch.tensor([0.0, 0.0, 50.0, -40.0, 0.0, 0.0]).view(1, 6, 1, 1)
    assert DiscMixLogistic(far, 8).mean().item() == 1.0


def test_dml_sample_variance_falls_with_t():
    # Two wide components at -0.4 and 0.4.
    n = 64
    p = torch.tensor([0.0, 0.0, -0.4, 0.4, -1.5, -1.5]).view(1, 6, 1, 1).expand(1, 6, n, n)
    d = DiscMixLogistic(p.contiguous(), 8)
    var = [d.sample(t).var().item() for t in (1.0, 0.7, 0.4, 0.1)]
    assert all(a > b for a, b in zip(var, var[1:])), var
    # One component: t multiplies the scale, so the variance shrinks like t^2.
    one = torch.tensor([0.0, 0.0, -3.0]).view(1, 3, 1, 1).expand(1, 3, n, n)
    one = DiscMixLogistic(one.contiguous(), 8)
    s = math.exp(-3.0)
    for t in (1.0, 0.5):
        assert abs(one.sample(t).var().item() / (t * s * math.pi / math.sqrt(3)) ** 2 - 1) < 0.15


def test_dml_lower_temperature_sharpens_mixture_choice():
    # Two very sharp components at -0.5 (logit 0) and 0.5 (logit 1).
    n = 64
    p = torch.tensor([0.0, 1.0, -0.5, 0.5, -7.0, -7.0]).view(1, 6, 1, 1).expand(1, 6, n, n)
    d = DiscMixLogistic(p.contiguous(), 8)
    frac = [(d.sample(t) > 0).double().mean().item() for t in (1.0, 0.5, 0.2)]
    assert abs(frac[0] - torch.sigmoid(torch.tensor(1.0)).item()) < 0.03
    assert frac[0] < frac[1] < frac[2] and frac[2] > 0.97, frac
    assert (d.sample(0.0) > 0).all()


def test_dml_float32_agrees_with_float64():
    # Scales from tiny to huge and means beyond the edges, 8 bits: float32 must
    # keep each pixel's log-probability accurate (stable log-difference).
    ls = torch.linspace(-7, 7, 29)
    mu = torch.linspace(-1.5, 1.5, 29)[torch.randperm(29)]
    x = torch.randint(0, 256, (64, 1, 29, 1)) / 127.5 - 1
    # one component per row h: logit 0, mean mu[h], log-scale ls[h]
    params = torch.stack([torch.zeros(29), mu, ls]).view(1, 3, 29, 1).expand(64, -1, -1, -1)
    lp32 = DiscMixLogistic(params.contiguous(), 8).log_prob(x)
    lp64 = DiscMixLogistic(params.double(), 8).log_prob(x.double())
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-6, atol=2e-4)


@pytest.mark.parametrize("channels,bits", [(1, 3), (3, 2)])
def test_dml_sample_frequencies_match_log_prob(channels, bits):
    n = 200_000
    params = _dml_params(channels, 3, ls_low=-1.5, ls_high=-0.5, seed=5)
    x = _all_values(channels, bits)
    probs = DiscMixLogistic(params.expand(x.shape[0], -1, -1, -1), bits,
                            channels=channels).log_prob(x).exp()
    s = DiscMixLogistic(params.expand(1, -1, n, 1).contiguous(), bits, channels=channels).sample()
    k = 2 ** bits
    idx = torch.round((s[0, :, :, 0].T + 1) * (k - 1) / 2).long()  # [n, C]
    flat = sum(idx[:, c] * k ** (channels - 1 - c) for c in range(channels))
    freq = torch.bincount(flat, minlength=k ** channels).double() / n
    assert (freq - probs.double()).abs().max() < 4 * math.sqrt(0.25 / n) + 1e-3


# --------------------------------------------------------------- Bernoulli ----
def test_bernoulli_matches_torch():
    logits = torch.randn(4, 1, 5, 5) * 5
    x = torch.bernoulli(torch.full_like(logits, 0.5))
    b = Bernoulli(logits)
    ref = td.Bernoulli(logits=logits).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(b.log_prob(x), ref)
    torch.testing.assert_close(b.mean(), torch.sigmoid(logits))
    s = Bernoulli(torch.full((200_000,), 0.7).view(1, -1)).sample()
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    assert abs(s.mean().item() - torch.sigmoid(torch.tensor(0.7)).item()) < 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Bernoulli(logits.bfloat16()).log_prob(x).dtype == torch.float32


# -------------------------------------------------------------- transforms ----
def _jacobian_logdet(f, x):
    """log|det J| per batch item from autograd, for a map [B, ...] -> [B, ...]."""
    j = torch.autograd.functional.jacobian(lambda v: f(v)[0], x)
    b, d = x.shape[0], x[0].numel()
    j = j.reshape(b, d, b, d)
    return torch.stack([torch.linalg.slogdet(j[i, :, i, :])[1] for i in range(b)])


TRANSFORMS = [
    ("logit", Logit(0.05), lambda: torch.rand(3, 2, 2, 2, dtype=torch.float64) * 0.98 + 0.01),
    ("logit0", Logit(0.0), lambda: torch.rand(3, 2, 2, 2, dtype=torch.float64) * 0.98 + 0.01),
    ("sigmoid", Sigmoid(), lambda: torch.randn(3, 2, 2, 2, dtype=torch.float64) * 3),
    ("tanh", Tanh(), lambda: torch.randn(3, 2, 2, 2, dtype=torch.float64) * 2),
]


@pytest.mark.parametrize("name,tr,make", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_transform_inverse_and_log_det(name, tr, make):
    x = make()
    y, ld = tr.forward(x)
    assert ld.shape == (3,)
    x2, ild = tr.inverse(y)
    torch.testing.assert_close(x2, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld, _jacobian_logdet(tr.forward, x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ild, _jacobian_logdet(tr.inverse, y), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ild, -ld, rtol=1e-9, atol=1e-9)


def test_dequantize_roundtrip_range_and_log_det():
    dq = Dequantize(256)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0, 255
    y, ld = dq.forward(x)
    assert y.dtype == torch.float32 and (y >= 0).all() and (y < 1).all()
    torch.testing.assert_close(ld, torch.full((4,), -75 * math.log(256)))
    back, ild = dq.inverse(y)
    assert torch.equal(back, x.long())
    torch.testing.assert_close(ild, -ld)
    # The log-det is that of the (continuous) affine part x -> (x + u) / 256.
    xf = torch.randint(0, 256, (2, 1, 2, 2)).double()
    torch.testing.assert_close(dq.forward(xf)[1], _jacobian_logdet(dq.forward, xf))


def test_dequantize_top_bin_stays_below_one():
    dq = Dequantize(256)
    y, _ = dq.forward(torch.full((2, 100_000), 255))
    assert (y < 1).all()


@pytest.mark.parametrize("v", [20.0, 50.0])
def test_tanh_log_det_float32_large_inputs(v):
    x = torch.tensor([[v, -v], [v / 2, -v / 2]])
    _, ld = Tanh().forward(x)
    a = x.double().abs()
    ref = (math.log(4) - 2 * a - 2 * torch.log1p(torch.exp(-2 * a))).sum(dim=1)
    assert torch.isfinite(ld).all()
    torch.testing.assert_close(ld.double(), ref, rtol=1e-6, atol=1e-4)


def test_sigmoid_and_logit0_log_dets_are_negatives():
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 4
    y, ld_sig = Sigmoid().forward(x)
    _, ld_logit = Logit(0.0).forward(y)
    torch.testing.assert_close(ld_logit, -ld_sig, rtol=1e-9, atol=1e-9)


def test_dequantize_logit_bits_per_dim_offset():
    """The uniform density on [0, 1] has 0 bits/dim; after Dequantize(256) it
    is a discrete model with exactly 8 bits/dim.  A standard logistic in logit
    space with Logit(alpha) is uniform on the squeezed interval, so its bpd is
    8 - log2(1 - alpha)."""
    alpha = 0.05
    x = torch.randint(0, 256, (6, 3, 8, 8))
    d = x[0].numel()
    u, ld_deq = Dequantize(256).forward(x)
    y, ld_logit = Logit(alpha).forward(u.double())
    log_py = (-y - 2 * torch.nn.functional.softplus(-y)).sum(dim=(1, 2, 3))  # standard logistic
    bpd = -(log_py + ld_logit + ld_deq.double()) / (d * math.log(2))
    torch.testing.assert_close(bpd, torch.full((6,), 8 - math.log2(1 - alpha), dtype=torch.float64))
    torch.testing.assert_close(-ld_deq / (d * math.log(2)), torch.full((6,), 8.0))
