"""Tests of hvae.model: architecture fidelity, KL and flow maths, sampling, numerics.

Forward/backward runs use tiny configs; the paper presets are built on the meta
device (structure and parameter counts only, no memory or init cost).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from hvae.distributions import Normal
from hvae.config import PRESETS, preset
from hvae.model import NVAE, NVAEOutput
from hvae.model import cells
from hvae.model.cells import Conv2d, bn_act_conv, batch_norm
from hvae.model.flows import IAFCell, ShiftCell
from latent_probes import (combiner_latents, jacobian_log_det, normal_log_density, per_image,
                           perturb_flows, priors_given, record_inputs, standardised)

TINY = dict(num_channels_enc=8, num_channels_dec=8, num_latent_per_group=4,
            num_groups_per_scale=2, batch_size=4)
# Reduced copies of the paper presets: fewer channels/groups, smaller images.
REDUCED = {
    "demo": dict(TINY),
    "mnist": dict(TINY, num_preprocess_cells=2, num_postprocess_cells=2),
    "cifar10": dict(TINY, image_size=8),
    "celeba64": dict(TINY, image_size=16),
    "imagenet32": dict(TINY, image_size=8),
    "celebahq256": dict(TINY, image_size=32, num_groups_per_scale=4, min_groups_per_scale=1),
    "ffhq256": dict(TINY, image_size=32, num_groups_per_scale=4, min_groups_per_scale=1),
}
# Parameter counts of NVAE's own code (NVlabs/NVAE 9fc1a28) with the presets' flags,
# flows included (NVAE's shift cells, the default flow_type); cifar10 also without.
REFERENCE_COUNTS = {("mnist", 0): 33_363_134, ("cifar10", 0): 129_215_680,
                    ("cifar10", 1): 130_852_480, ("celeba64", 1): 153_281_364,
                    ("imagenet32", 1): 268_509_444, ("celebahq256", 2): 330_798_664}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def make(name="demo", **overrides):
    torch.manual_seed(0)
    return NVAE(preset(name, **{**REDUCED.get(name, TINY), **overrides}))


def data(model, batch=4, seed=1):
    """A batch on the model's data grid: binary, or on the bit-depth's bin centres."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    if cfg.binary:
        return (torch.rand(shape, generator=g) > 0.5).float()
    levels = 2 ** cfg.num_x_bits - 1
    return torch.randint(0, levels + 1, shape, generator=g).float() / levels


# ------------------------------------------------------------ architecture --
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    for nf in (0, PRESETS[name].get("num_nf", 0)):
        with torch.device("meta"):
            model = NVAE(preset(name, num_nf=nf))
        assert model.num_groups == sum(model.config.groups_per_scale())
        assert len(model.latent_shapes) == model.num_groups
        if nf:
            assert all(g.flow is not None and len(g.flow.cells) == 2 * nf for g in model.groups)


@pytest.mark.parametrize("name,num_nf", sorted(REFERENCE_COUNTS))
def test_param_count_equals_nvae(name, num_nf):
    with torch.device("meta"):
        model = NVAE(preset(name, num_nf=num_nf))
    assert num_params(model) == REFERENCE_COUNTS[name, num_nf]
    if num_nf:  # the affine IAF is another cell, with more parameters
        with torch.device("meta"):
            affine = NVAE(preset(name, num_nf=num_nf, flow_type="affine"))
        assert num_params(affine) > num_params(model)


def test_knobs_change_the_model():
    base = make()
    n = num_params(base)
    for key, value in [("use_se", False), ("num_cell_per_cond_enc", 2), ("num_cell_per_cond_dec", 2),
                       ("num_channels_enc", 16), ("num_channels_dec", 16), ("num_latent_per_group", 6),
                       ("num_nf", 1), ("num_preprocess_cells", 3), ("num_postprocess_cells", 3)]:
        assert num_params(make(**{key: value})) != n, key
    assert make(num_groups_per_scale=4, ada_groups=True).config.groups_per_scale() == [2, 4]
    assert make(num_groups_per_scale=4, ada_groups=False).num_groups == 8
    assert make(num_groups_per_scale=4, ada_groups=True, min_groups_per_scale=3).num_groups == 7
    rgb = make("cifar10", num_mixture_dec=3)
    assert rgb.head[1].out_channels == 30
    assert make("demo").head[1].out_channels == 1


def test_convs_are_weight_normalised():
    model = make()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)
    for conv in convs:  # at initialisation the normalised weight is the initial weight
        torch.testing.assert_close(conv.normalized_weight(), conv.weight, rtol=1e-4, atol=1e-4)
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.modules() if "Norm" in type(m).__name__)


def test_shapes_and_dims():
    model = make("mnist")
    assert model.data_dims == 28 * 28
    assert model.latent_shapes[0] == (4, 4, 4) and model.latent_shapes[-1] == (4, 8, 8)
    out = model(data(model))
    assert isinstance(out, NVAEOutput)
    assert out.likelihood.dist.logits.shape == (4, 1, 28, 28)  # padding cropped
    assert [z.shape[1:] for z in out.z] == [torch.Size(s) for s in model.latent_shapes]
    assert all(k.shape == (4,) for k in out.kl)
    assert all(k.shape == (4, 4) for k in out.kl_per_channel)


# ------------------------------------------------------ forward / backward --
@pytest.mark.parametrize("name", list(PRESETS))
def test_forward_backward_reduced_presets(name):
    model = make(name)  # keeps the preset's own num_nf
    x = data(model, batch=2)
    out = model(x)
    recon = -out.likelihood.log_prob(x)
    assert recon.shape == (2,)
    loss = (recon + sum(out.kl)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("keep", [True, False], ids=["keeps", "recomputes"])
def test_fused_bn_act_conv_matches_plain_path(monkeypatch, keep):
    """Both backward paths (CPU: keeps BN output and activation; accelerators:
    recomputes them from x) give the plain path's values and gradients."""
    monkeypatch.setattr(cells, "KEEP_BN_ACT_ON", frozenset({"cpu"} if keep else ()))
    torch.manual_seed(0)
    for act, up, groups in [(True, False, 1), (False, True, 1), (True, False, 6)]:
        bn, conv = batch_norm(6).double(), Conv2d(6, 6 if groups > 1 else 4, 3, groups=groups).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        bn2, conv2 = copy.deepcopy(bn), copy.deepcopy(conv)
        x1 = torch.randn(3, 6, 5, 5, dtype=torch.double, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            saved = []
            y1 = bn_act_conv(x1, bn, conv, act, up)
        activation_sized = sum(t.numel() >= x1.numel() for t in saved)
        assert activation_sized == (1 + 2 * keep)  # x, and when keeping: the BN output and h
        h = bn2(x2)
        h = torch.nn.functional.silu(h) if act else h
        h = torch.nn.functional.interpolate(h, scale_factor=2) if up else h
        y2 = conv2(h)
        g = torch.randn_like(y1)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(bn.running_var, bn2.running_var)
        for p1, p2 in zip([*bn.parameters(), *conv.parameters()], [*bn2.parameters(), *conv2.parameters()]):
            torch.testing.assert_close(p1.grad, p2.grad)


# ---------------------------------------------------------------- the KL --
def _closed_form_kl(mq, log_sq, mp, log_sp):
    mq, sq, mp, sp = mq.double(), log_sq.double().exp(), mp.double(), log_sp.double().exp()
    return (torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5).sum(dim=(2, 3))


def test_kl_matches_closed_form():
    model = make(num_groups_per_scale=3)
    out = model(data(model))
    for mq, sq, mp, sp, kl, kl_c in zip(out.q_mu, out.q_log_sigma, out.p_mu, out.p_log_sigma,
                                        out.kl, out.kl_per_channel):
        expected = _closed_form_kl(mq, sq, mp, sp)
        torch.testing.assert_close(kl_c.double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kl.double(), expected.sum(1), rtol=1e-4, atol=1e-3)
    # the top prior is NVAE's N(0, 1.01^2) (sigma floor 0.01); the others come from the decoder
    assert torch.all(out.p_mu[0] == 0)
    torch.testing.assert_close(out.p_log_sigma[0], torch.full_like(out.p_log_sigma[0], math.log(1.01)))
    assert not torch.all(out.p_mu[1] == 0)


def test_monte_carlo_kl_matches_independent_log_densities():
    """kl_mc without flows: log q, log p and the KL against densities written out here."""
    model = make()
    out = model(data(model), analytic_kl=False)  # the caller's choice (the trainer: kl_mc)
    for i, (z, kl, kl_c, lq, lp) in enumerate(zip(out.z, out.kl, out.kl_per_channel, out.log_q,
                                                 out.log_p)):
        log_q = normal_log_density(z, out.q_mu[i], out.q_log_sigma[i])
        log_p = normal_log_density(z, out.p_mu[i], out.p_log_sigma[i])
        torch.testing.assert_close(lq.double(), per_image(log_q), rtol=1e-5, atol=2e-3)
        torch.testing.assert_close(lp.double(), per_image(log_p), rtol=1e-5, atol=2e-3)
        torch.testing.assert_close(kl.double(), per_image(log_q - log_p), rtol=1e-5, atol=2e-3)
        torch.testing.assert_close(kl_c.double(), (log_q - log_p).sum(dim=(2, 3)),
                                   rtol=1e-5, atol=1e-3)
        assert kl.requires_grad


def test_log_q_and_log_p_values():
    model = make()
    out = model(data(model))
    for i, (z, lq, lp) in enumerate(zip(out.z, out.log_q, out.log_p)):
        q = Normal(out.q_mu[i], out.q_log_sigma[i])
        p = Normal(out.p_mu[i], out.p_log_sigma[i])
        torch.testing.assert_close(lq, q.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(lp, p.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-3)


def _posterior_params(model, x):
    with torch.no_grad():
        out = model(x, use_mean=True)
    return [(mu.clone(), log_sigma.clone()) for mu, log_sigma in zip(out.q_mu, out.q_log_sigma)]


@pytest.mark.parametrize("res_dist", [False, True])
def test_residual_posterior_uses_prior_only_when_enabled(res_dist):
    model = make(res_dist=res_dist).eval()
    x = data(model)
    before = _posterior_params(model, x)
    with torch.no_grad():
        for group in model.groups[1:]:
            conv = group.prior[1]
            conv.bias.add_(torch.randn_like(conv.bias))
    after = _posterior_params(model, x)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))
    assert same != res_dist


# ---------------------------------------------------------------- flows --
def _perturbed_cell(reverse, num_z=4, c_ctx=3):
    torch.manual_seed(3)
    cell = IAFCell(num_z, c_ctx, reverse=reverse).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cell


@pytest.mark.parametrize("reverse", [False, True])
def test_flow_cell_jacobian_is_triangular_with_matching_log_det(reverse):
    cell = _perturbed_cell(reverse)
    z = torch.randn(1, 4, 2, 2, dtype=torch.double)
    ctx = torch.randn(1, 3, 2, 2, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda v: cell(v, ctx)[0], z).reshape(16, 16)
    if reverse:  # the reversed cell is autoregressive in reversed channel order
        perm = torch.arange(16).reshape(4, 4).flip(0).reshape(-1)
        jac = jac[perm][:, perm]
    # channel-major order: latent channel k depends only on channels before it
    assert torch.allclose(jac, torch.tril(jac), atol=1e-12)
    blocks = jac.reshape(4, 4, 4, 4)
    for k in range(4):  # diagonal blocks are diagonal
        assert torch.allclose(blocks[k, :, k, :], torch.diag(torch.diagonal(blocks[k, :, k, :])))
    assert torch.tril(jac, -1).abs().max() > 1e-4  # genuinely autoregressive
    _, log_det = cell(z, ctx)
    assert log_det.shape == (1, 4)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign > 0
    torch.testing.assert_close(log_det.sum(), logabs)
    assert log_det.sum().abs() > 1e-3


@pytest.mark.parametrize("mirror", [False, True])
def test_shift_cell_is_raster_autoregressive_with_unit_diagonal(mirror):
    """NVAE's cell: z'_k at position p depends on z at positions before p (raster
    order; reversed when mirrored) and on channels < k at p; dz'/dz has a unit
    diagonal, so log|det| = 0, which is what the cell reports.  The context is
    ignored."""
    torch.manual_seed(3)
    cell = ShiftCell(3, mirror=mirror).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(1, 3, 3, 3, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda v: cell(v)[0], z).reshape(27, 27)
    # order: position-major (raster), then channel; mirrored cells run positions backwards
    pos = torch.arange(9).flip(0) if mirror else torch.arange(9)
    perm = (pos[:, None] + 9 * torch.arange(3)[None, :]).reshape(-1)
    jac = jac[perm][:, perm]
    assert torch.allclose(jac, torch.tril(jac), atol=1e-12)
    torch.testing.assert_close(torch.diagonal(jac), torch.ones(27, dtype=torch.double))
    assert torch.tril(jac, -1).abs().max() > 1e-3  # genuinely autoregressive
    z1, log_det = cell(z, torch.randn(1, 5, 3, 3, dtype=torch.double))
    assert torch.equal(z1, cell(z)[0]) and torch.equal(log_det, torch.zeros(1, 3, dtype=torch.double))


def test_flow_types_and_nvae_parameter_layout():
    """NVAE's cell by default, with NVAE's parameter shapes; the affine IAF by name."""
    model = make("cifar10", num_nf=1)
    cell = model.groups[0].flow.cells[0]
    assert isinstance(cell, ShiftCell) and len(model.groups[0].flow.cells) == 2
    shapes = {k: list(v.shape) for k, v in cell.state_dict().items()}
    L = model.config.num_latent_per_group
    assert shapes == {"inp.weight": [6 * L, L, 3, 3], "inp.log_weight_norm": [6 * L, 1, 1, 1],
                      "mid.weight": [6 * L, 1, 5, 5], "mid.log_weight_norm": [6 * L, 1, 1, 1],
                      "out.weight": [L, 6 * L, 1, 1], "out.bias": [L],
                      "out.log_weight_norm": [L, 1, 1, 1]}
    assert isinstance(make("cifar10", num_nf=1, flow_type="affine").groups[0].flow.cells[0], IAFCell)


def test_flow_log_det_depends_on_context_and_starts_near_identity():
    torch.manual_seed(0)
    cell = IAFCell(4, 3, reverse=False)
    z = torch.randn(2, 4, 3, 3)
    ctx = torch.randn(2, 3, 3, 3)
    z1, ld1 = cell(z, ctx)
    z2, ld2 = cell(z, ctx + 1.0)
    assert not torch.allclose(ld1, ld2) and not torch.allclose(z1, z2)
    assert torch.all(ld1.sum(1) != 0)
    assert (z1 - z).abs().mean() < 0.3 * z.abs().mean()  # near the identity at init


def _flow_model(name="cifar10", num_nf=1, **overrides):
    """A tiny model (64 latent values per group) with flows moved away from their
    near-identity initialisation (every flow parameter perturbed)."""
    return perturb_flows(make(name, num_nf=num_nf, **overrides), seed=7)


@pytest.mark.parametrize("flow_type", ["nvae", "affine"])
@pytest.mark.parametrize("use_mean", [False, True])
def test_flow_log_q_is_base_density_minus_jacobian_log_det(use_mean, flow_type):
    """With flows, log q(z) = log N(z0; mu_q, sigma_q) - log|det dz/dz0| per group.

    z0 and the flow's context are captured from outside (pre-hooks on each
    group's flow); the log-det comes from the Jacobian of the flow over all of an
    image's latent values (central differences in float64), not from the flow's
    own log-det output; the densities are written out too.  A wrong sign (a
    dropped) log-det moves log q by twice (once) the log-det, 10 to 20 nats here
    against a tolerance of 5e-3.  Nothing beyond ``flow(z0, context) -> (z,
    log_det)`` is assumed, so a volume-preserving flow passes with log-det 0.
    """
    model = _flow_model(flow_type=flow_type)
    x = data(model, batch=2)
    with torch.no_grad(), record_inputs([g.flow for g in model.groups]) as calls:
        torch.manual_seed(3)
        out = model(x, use_mean=use_mean)
    for i, group in enumerate(model.groups):
        (z0, context), = calls[i]
        if use_mean:
            torch.testing.assert_close(z0, out.q_mu[i])
        z, _ = group.flow(z0, context)
        torch.testing.assert_close(out.z[i], z)        # the model's z is the flow's output
        assert not torch.allclose(out.z[i], z0, atol=1e-3)  # and the flow did something
        log_det = jacobian_log_det(group.flow, z0, context)
        base = per_image(normal_log_density(z0, out.q_mu[i], out.q_log_sigma[i]))
        torch.testing.assert_close(out.log_q[i].double(), base - log_det, rtol=1e-5, atol=5e-3)
        log_p = per_image(normal_log_density(out.z[i], out.p_mu[i], out.p_log_sigma[i]))
        torch.testing.assert_close(out.log_p[i].double(), log_p, rtol=1e-5, atol=5e-3)
        torch.testing.assert_close(out.kl[i].double(), base - log_det - log_p,
                                   rtol=1e-5, atol=5e-3)
    if not use_mean:
        assert all(k.requires_grad for k in model(x).kl)


# --------------------------------------------------- sampling and latents --
def test_sample_shapes_and_ranges():
    model = make("mnist").eval()
    for t in (1.0, 0.7, [0.5] * model.num_groups):
        x = model.sample(3, t=t)
        assert x.shape == (3, 1, 28, 28)
        assert x.min() >= 0 and x.max() <= 1
    binary = model.sample(2, output="sample")
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="temperatures"):
        model.sample(2, t=[1.0] * (model.num_groups + 1))
    rgb = make("cifar10").eval()
    x = rgb.sample(2, t=0.8)
    assert x.shape == (2, 3, 8, 8) and x.min() >= 0 and x.max() <= 1
    levels = x * 255
    torch.testing.assert_close(levels, levels.round())


def test_sampling_uses_no_encoder():
    model = make().eval()
    calls = []
    for m in [model.stem, model.pre, *model.enc_cells, model.enc0]:
        m.register_forward_hook(lambda *a: calls.append(1))
    model.sample(2)
    assert not calls


@pytest.mark.parametrize("temps", [[1.0, 0.5, 0.0], [0.0, 1.0, 0.25], 0.6, 0.0])
def test_sample_temperature_scales_each_groups_prior_sigma(temps):
    """model.sample(n, t): group i's z = mu_p + t_i sigma_p eps, whatever the other groups' t.

    The z each combiner receives is recorded; the priors those latents induce
    are recomputed by a forward pass fed the same latents (teacher forcing).
    The standardised residual (z - mu_p) / sigma_p must have standard deviation
    t_i (exactly zero at t_i = 0, no division by t).  n values per group give a
    relative standard error of 1 / sqrt(2 n) on a standard deviation: 0.8% at
    n = 32 x 256 (the smallest group here), so 10% is over 10 standard errors.
    """
    model = make().eval()
    per_group = [temps] * model.num_groups if isinstance(temps, float) else temps
    torch.manual_seed(4)
    with combiner_latents(model) as z:
        images = model.sample(32, t=temps)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    p_mu, p_log_sigma = priors_given(model, z)
    for i, (r, t) in enumerate(zip(standardised(z, p_mu, p_log_sigma), per_group)):
        assert torch.isfinite(r).all(), i
        if t == 0:
            torch.testing.assert_close(z[i], p_mu[i], rtol=0, atol=1e-5)
        else:
            assert abs(r.std().item() / t - 1) < 0.1, (i, t, r.std().item())
            assert abs(r.mean().item()) < 5 * t / math.sqrt(r.numel()), (i, r.mean().item())


def test_dml_output_temperature_shrinks_spread_around_the_t0_sample():
    """output_t multiplies the pixel logistic's scales: at t = 0 the output is the same
    for any noise (the most probable component's location, no NaN), and lower t stays
    closer to it."""
    model = make("cifar10").eval()
    with torch.no_grad():
        z = model.encode(data(model, batch=8), use_mean=True)
        outs = {}
        for t in (0.0, 0.3, 1.0):
            torch.manual_seed(0)
            outs[t] = model.decode(z, output="sample", output_t=t)
        torch.manual_seed(1)
        again = model.decode(z, output="sample", output_t=0.0)
    assert torch.isfinite(outs[0.0]).all()
    torch.testing.assert_close(again, outs[0.0], rtol=0, atol=0)
    spread = [(outs[t] - outs[0.0]).abs().mean().item() for t in (0.3, 1.0)]
    assert 0 < spread[0] < spread[1], spread


def test_decode_of_encoded_latents_reproduces_the_forward_pass():
    """decode(encode(x)) runs the top-down pass again from the latents alone: its output
    distribution's mean equals the forward pass's, with and without flows (encode returns
    the latents after the flows, which decode must not apply again)."""
    for overrides in (dict(), dict(num_nf=1)):
        model = make(**overrides).eval()
        x = data(model)
        with torch.no_grad():
            z = model.encode(x, use_mean=True)
            assert [tuple(v.shape[1:]) for v in z] == model.latent_shapes
            expected = model(x, use_mean=True).likelihood.mean()
            decoded = model.decode(z, output="mean")
        assert decoded.shape == x.shape
        torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        model.decode([])  # no latents and no batch size


def test_decode_uses_given_groups_and_draws_the_rest_from_the_prior():
    """decode(z[:1], t): group 0 is the given latent; group 1 is drawn from the prior
    that latent induces (at t = 0 its mean, as the forward pass computes it)."""
    model = make().eval()
    x = data(model)
    with torch.no_grad():
        out = model(x, use_mean=True)
        z = out.z
        with combiner_latents(model) as seen:
            model.decode(z[:1], t=0.0)
        torch.testing.assert_close(seen[0], z[0], rtol=0, atol=0)
        torch.testing.assert_close(seen[1], out.p_mu[1], rtol=1e-5, atol=1e-5)
        torch.manual_seed(0)
        with combiner_latents(model) as warm:
            model.decode(z[:2], t=0.7)
    torch.testing.assert_close(warm[1], z[1], rtol=0, atol=0)
    p_mu, p_log_sigma = priors_given(model, warm)
    r = standardised(warm, p_mu, p_log_sigma)[2]
    assert abs(r.std().item() / 0.7 - 1) < 0.1  # 4 x 1024 values: 1.1% standard error


def test_batch_composition_does_not_change_an_example():
    model = make("cifar10", num_nf=1)
    x = data(model, batch=4)
    model.train()
    model(x)  # move the BN running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        full = model(x, use_mean=True)
        alone = model(x[:1], use_mean=True)
    torch.testing.assert_close(full.likelihood.log_prob(x)[:1], alone.likelihood.log_prob(x[:1]))
    for a, b in zip(full.kl, alone.kl):
        torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-4)


def test_repeats_share_the_encoder_exactly_in_eval_mode():
    """model(x, repeats=k) == model(x.repeat_interleave(k)) (encoder run once per image)."""
    model = make("cifar10", num_nf=1)
    x = data(model, batch=3)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        shared = model(x, use_mean=True, repeats=2)
        plain = model(x.repeat_interleave(2, dim=0), use_mean=True)
        xs = x.repeat_interleave(2, dim=0)
        torch.testing.assert_close(shared.likelihood.log_prob(xs), plain.likelihood.log_prob(xs))
        for a, b in zip(shared.log_q + shared.log_p, plain.log_q + plain.log_p):
            torch.testing.assert_close(a, b)
        torch.manual_seed(0)
        sampled = model(x, repeats=5)
    assert sampled.z[-1].shape[0] == 15
    assert not torch.equal(sampled.z[-1][0], sampled.z[-1][1])  # independent draws per copy


# ------------------------------------------------------------- numerics --
def test_bf16_autocast_forward_is_finite_float32():
    model = make("cifar10", num_nf=1)
    x = data(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        log_px = out.likelihood.log_prob(x)
    assert log_px.dtype == torch.float32 and torch.isfinite(log_px).all()
    assert all(k.dtype == torch.float32 and torch.isfinite(k).all() for k in out.kl)
    (sum(out.kl) - log_px).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_matches_channels_first():
    cf = make("cifar10", num_nf=1)
    cl = make("cifar10", num_nf=1, channels_last=True)
    cl.load_state_dict(cf.state_dict())
    assert cl.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = data(cf)
    cf.eval(), cl.eval()
    with torch.no_grad():
        a, b = cf(x, use_mean=True), cl(x, use_mean=True)
    torch.testing.assert_close(a.likelihood.log_prob(x), b.likelihood.log_prob(x), rtol=1e-4, atol=1e-2)
    cl.train()
    out = cl(x)
    (sum(out.kl) - out.likelihood.log_prob(x)).mean().backward()


def test_bad_input_shape_raises():
    model = make()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(2, 1, 32, 32))


def test_mnist_likelihood_counts_real_pixels_only():
    model = make("mnist")
    x = data(model)
    out = model(x)
    dist = out.likelihood.dist
    manual = -torch.nn.functional.binary_cross_entropy_with_logits(
        dist.logits, x, reduction="none").sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.likelihood.log_prob(x), manual)
    assert math.prod(dist.logits.shape[1:]) == model.data_dims


def test_cell_expansions_are_config_fields_with_nvaes_defaults():
    """--dec_cell_expand / --post_cell_expand set the hidden width of decoder and
    post-processing cells (NVAE's 6 and 3 by default and in every paper recipe; the
    CPU demo halves them); 0 is refused."""
    from hvae.config import Config, ConfigError
    from hvae.model.cells import DecCell
    assert (Config().dec_cell_expand, Config().post_cell_expand) == (6, 3)
    for name in PRESETS:
        expected = (3, 2) if name == "demo" else (6, 3)
        assert (preset(name).dec_cell_expand, preset(name).post_cell_expand) == expected, name
    cfg = preset("demo", num_channels_enc=8, num_channels_dec=8)
    for dec, post in [(6, 3), (2, 1)]:
        model = NVAE(cfg.replace(dec_cell_expand=dec, post_cell_expand=post))
        cell = model.groups[-1].dec_cells[0]
        assert isinstance(cell, DecCell) and cell.conv0.out_channels == dec * cell.conv0.in_channels
        post_cell = model.post[-1]
        assert post_cell.conv0.out_channels == post * post_cell.conv0.in_channels
        out = model(torch.bernoulli(torch.full((2, 1, 28, 28), 0.3)))
        assert torch.isfinite(out.params).all()
    with pytest.raises(ConfigError, match="dec_cell_expand"):
        cfg.replace(dec_cell_expand=0).validate()


def test_repeated_images_keep_their_memory_layout():
    """The IW pass repeats encoder features per sample; NCHW copies would send a
    channels-last model's BatchNorms and convs down their slow layout paths."""
    from hvae.model.nvae import repeat_images
    x = torch.randn(3, 5, 4, 4)
    for t, channels_last in [(x, False), (x.contiguous(memory_format=torch.channels_last), True)]:
        r = repeat_images(t, 2)
        assert torch.equal(r, t.repeat_interleave(2, dim=0))
        assert r.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_deterministic_bilinear_upsampling_is_interpolate(dtype):
    """The matmul form of NVAE's align_corners bilinear x2 (taken on CUDA under
    --deterministic, where interpolate's backward refuses): same values and gradients."""
    import torch.nn.functional as F
    from hvae.model.cells import upsample2x_bilinear_by_matmul
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    for shape in [(2, 3, 4, 4), (1, 2, 7, 5), (2, 4, 1, 1)]:
        x = torch.randn(*shape).to(dtype).requires_grad_()
        ours = upsample2x_bilinear_by_matmul(x)
        theirs = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        torch.testing.assert_close(ours, theirs, **tol)
        g = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0],
                                   torch.autograd.grad(theirs, x, g)[0], **tol)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert upsample2x_bilinear_by_matmul(x).is_contiguous(memory_format=torch.channels_last)
