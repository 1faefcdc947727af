"""The compiled fast path (``Config.compile``): which parts of the NVAE torch.compile sees.

``auto``      the default: ``regional`` on CUDA, ``none`` elsewhere
              (``hvae.runtime.choose_fast_path`` resolves it when a run starts).
``none``      eager.
``regional``  each repeated module (every outermost ``cells.Region``: encoder cell,
              post-processing decoder cell, latent group with its decoder cells,
              prior, posterior, flows and combiner) runs a compiled ``forward``.  The compiled function is
              one per class, shared by all instances, and its code is reused by
              every instance of the same structure and shapes, so compile time
              grows with the number of distinct cells (a few per scale), not with
              the number of groups.  Shapes are static; train and eval mode, and
              each batch size, compile their own variant once.
``full``      the whole forward after the weight stacking, one graph (slow to
              compile for deep models: minutes for cifar10).

Everything around the forward stays eager: the weight stacking
(``hvae.model.bank``), the loss, KL warm-up and learning-rate schedules (plain
numbers that change every step and so never reach a compiled region), the
regularisers, backward, the optimiser.  Inside compiled regions the fused
BN-Swish-conv autograd Function is replaced by the plain ops (see
``cells.bn_act_conv``).  Modules keep their parameters: ``state_dict``, DDP and
``copy.deepcopy`` (the EMA) see the usual module; a deep copy of a compiled
module is compiled too (its ``forward`` is rebound to the copy).
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from hvae.config import COMPILE_MODES as MODES, ConfigError
from hvae.model.cells import Region

BACKEND = "inductor"   # tests use "aot_eager" (no code generation)
RECOMPILE_LIMIT = 64   # variants per compiled function (cell kinds x scales x train/eval x batch sizes)

_compiled: dict = {}


def _compiled_function(fn, backend: str):
    """torch.compile(fn), one per (function, backend), shared by every module that uses it."""
    key = (fn, backend)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, backend=backend, dynamic=False)
    return _compiled[key]


def _install(module: nn.Module, name: str, backend: str) -> None:
    """Make ``module.<name>`` the compiled version of its class's method."""
    fn = _compiled_function(getattr(type(module), name), backend)
    setattr(module, name, types.MethodType(fn, module))


def regions(model: nn.Module) -> list[nn.Module]:
    """The modules ``regional`` compiles and checkpointing recomputes: the outermost
    ``Region``s (encoder cells, decoder cells, latent groups; cells inside a latent
    group are traced with it)."""
    found, inside = [], set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, Region):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def compile_model(model: nn.Module, mode: str, backend: str | None = None) -> nn.Module:
    """Apply ``mode`` (one of ``MODES``) to ``model`` in place and return it."""
    if mode not in MODES:  # a ConfigError: the entry points report it in one line
        raise ConfigError(f"compile={mode!r} is not allowed: one of {', '.join(MODES)}")
    if mode == "auto":  # what a run on the model's device would choose
        from hvae.runtime import resolve_compile
        mode = resolve_compile(mode, next(model.parameters()).device)[0]
    if mode == "none":
        return model
    backend = backend or BACKEND
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if mode == "regional":
        for region in regions(model):
            _install(region, "forward", backend)
    else:
        _install(model, "_forward", backend)
    return model
