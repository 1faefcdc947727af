"""Helpers for tests that check latent values from outside the model.

Only the public surface is used: forward pre-hooks on ``model.groups[i].flow``
(called as ``flow(z0, context)``) and ``model.groups[i].combiner`` (called as
``combiner(state, z)``), and the output's ``q_mu`` / ``q_log_sigma`` /
``p_mu`` / ``p_log_sigma`` / ``z`` / ``log_q`` / ``log_p`` fields.  Densities
are written out here in float64 rather than taken from ``hvae.distributions``,
so a test comparing them with the model's own numbers checks two independent
computations.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def normal_log_density(z, mu, log_sigma):
    """Elementwise log N(z; mu, exp(log_sigma)^2) in float64."""
    z, mu, log_sigma = z.double(), mu.double(), log_sigma.double()
    u = (z - mu) * torch.exp(-log_sigma)
    return -0.5 * u * u - log_sigma - HALF_LOG_2PI


def per_image(t):
    """Sum over every dimension but the first: [B, ...] -> [B]."""
    return t.reshape(t.shape[0], -1).sum(1)


@contextlib.contextmanager
def record_inputs(modules):
    """Record the positional tensor inputs of every call of each module.

    Yields one list per module; each call appends a tuple of detached copies.
    """
    records = [[] for _ in modules]

    def hook(record):
        def pre_hook(_module, args):
            record.append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(r)) for m, r in zip(modules, records)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def combiner_latents(model):
    """Yields a list with, per group, the z its combiner received (calls concatenated)."""
    latents: list[torch.Tensor] = []
    with record_inputs([g.combiner for g in model.groups]) as records:
        yield latents
    latents.extend(torch.cat([args[1] for args in calls]) for calls in records)


@contextlib.contextmanager
def forced_latents(model, latents):
    """Every combiner gets the given z instead of the one the pass drew (teacher forcing)."""
    def hook(z):
        return lambda _module, args: (args[0], z)

    handles = [g.combiner.register_forward_pre_hook(hook(z))
               for g, z in zip(model.groups, latents)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def priors_given(model, latents):
    """(p_mu, p_log_sigma) per group, each prior conditioned on the given latents of
    the groups above it: a forward pass (model in eval mode) with every combiner
    fed ``latents``.  The input image is irrelevant (only q depends on it)."""
    cfg = model.config
    x = torch.zeros(latents[0].shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
    with forced_latents(model, latents):
        out = model(x, use_mean=True)
    return out.p_mu, out.p_log_sigma


def standardised(latents, p_mu, p_log_sigma):
    """(z - mu_p) / sigma_p per group, float64."""
    return [(z.double() - m.double()) * torch.exp(-s.double())
            for z, m, s in zip(latents, p_mu, p_log_sigma)]


def jacobian_log_det(flow, z0, context, h=1e-4):
    """log |det dz/dz0| per image [B] of ``flow(z0, context) -> (z, log_det)``, in float64,
    independently of the log-det the flow reports: the Jacobian over all of one
    image's latent values (channels and positions) by central differences, all
    2 D perturbed copies in one batch.  In float64 the error of each entry is
    O(h^2) ~ 1e-8 relative, far below the tolerances of the tests using it."""
    flow = copy.deepcopy(flow).double()
    out = []
    with torch.no_grad():
        for b in range(z0.shape[0]):
            v = z0[b:b + 1].double()
            d = v.numel()
            steps = h * torch.eye(d, dtype=torch.float64).view(d, *v.shape[1:])
            ctx = context[b:b + 1].double().expand(2 * d, *context.shape[1:])
            z, _ = flow(torch.cat([v + steps, v - steps]), ctx)
            jac = ((z[:d] - z[d:]) / (2 * h)).reshape(d, d).T  # [output, input]
            out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def perturb_flows(model, seed: int, scale: float = 0.3):
    """Move every flow parameter away from its near-identity initialisation
    (seeded); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in model.groups:
            for p in group.flow.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()
