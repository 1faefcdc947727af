"""On a CUDA GPU (``pytest -m gpu``; skipped without one): the captured step against the
eager one, a skip inside the graph, exact resume, checkpointing inside the graph, and
the fast path chosen by default.  Synthetic data only: no dataset, no optional package."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from hvae.config import preset
from hvae.graphed_step import SyncFreeStep
from hvae.runtime import Runtime
from hvae.step import TrainStep
from hvae.training import Trainer

from test_graphed_step import assert_trainers_close, step_both
from test_training import TINY, _assert_same_run, bernoulli_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# compile "none": these tests are about the step, and a compile would take most of their time
PLAIN = dict(compile="none", ema_decay=0.9, learning_rate=2e-3)


def gpu() -> Runtime:
    return Runtime(device=torch.device("cuda", 0))


def synthetic_loader(batches: int = 8, batch_size: int = 16) -> torch.utils.data.DataLoader:
    images = torch.cat([bernoulli_batch(batch_size, seed=i) for i in range(batches)])
    return torch.utils.data.DataLoader(images, batch_size=batch_size, drop_last=True)


def tiny(tmp_path, **overrides):
    return preset("demo", out=str(tmp_path / "runs"), **{**TINY, **PLAIN, **overrides})


def trainer(tmp_path, resume=None, **overrides) -> Trainer:
    loader = synthetic_loader()
    return Trainer(tiny(tmp_path, **overrides), gpu(), progress=False, resume=resume,
                   loaders=(loader, loader))


def cuda_pair(tmp_path, **overrides) -> tuple[Trainer, Trainer]:
    """An eager and a captured trainer on the GPU, from the same weights."""
    eager = trainer(tmp_path / "eager", **{"cuda_graphs": "false", **overrides})
    graphed = trainer(tmp_path / "graphed", **{"cuda_graphs": "true", **overrides})
    graphed.model.load_state_dict(eager.model.state_dict())
    graphed.ema.model.load_state_dict(eager.ema.model.state_dict())
    assert type(eager.train_step_fn) is TrainStep
    assert type(graphed.train_step_fn) is SyncFreeStep and graphed.train_step_fn.capture
    return eager, graphed


def batch(i: int) -> torch.Tensor:
    return bernoulli_batch(16, seed=100 + i).cuda()


@pytest.fixture
def deterministic():
    """Deterministic kernels for the test, and back to the default after it."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_a_captured_step_trains_as_the_eager_step(tmp_path, amp):
    """20 steps (fp16: 24, the first ones overflow the initial loss scale and are skipped)."""
    eager, graphed = cuda_pair(tmp_path, amp=amp)
    half, taken = amp != "none", 0
    for i in range(24 if amp == "fp16" else 20):
        a, b = step_both(eager, graphed, batch(i), seed=300 + i)
        assert bool(a["skipped"]) == bool(b["skipped"]), i
        taken += not bool(b["skipped"])
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-2 if half else 1e-4,
                                   atol=1e-3, equal_nan=True, msg=f"step {i}")
    step = graphed.train_step_fn
    # captured after 3 warm-up steps, and again if KL balancing ended later
    assert taken >= 10 and step._graph is not None
    assert step.captures == (1 if graphed.schedule.balancing(len(range(i + 1)) - 1) else 2)
    assert_trainers_close(eager, graphed, rtol=1e-3, atol=5e-3 if half else 1e-4)


def test_a_captured_step_skips_a_nan_batch_without_a_trace(tmp_path):
    _, graphed = cuda_pair(tmp_path, amp="bf16")
    for i in range(6):  # warm-up, capture, replays
        graphed.train_step(batch(i))
    assert graphed.train_step_fn.captures == 1
    before = copy.deepcopy(graphed.model.state_dict())
    ema_before = copy.deepcopy(graphed.ema.model.state_dict())
    bad = batch(6)
    bad[0, 0, 5, 5] = math.nan
    metrics = graphed.train_step(bad)
    assert bool(metrics["skipped"]) and int(metrics["skipped_total"]) == 1
    for key, value in graphed.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in graphed.ema.model.state_dict().items():
        assert torch.equal(value, ema_before[key]), key
    assert not bool(graphed.train_step(batch(7))["skipped"])


def test_checkpointing_is_captured_and_trains_as_without(tmp_path):
    """Activation checkpointing inside the captured step: no fallback to eager steps, and
    the same training as the captured step without checkpointing."""
    _, plain = cuda_pair(tmp_path / "plain", amp="bf16")
    _, remat = cuda_pair(tmp_path / "remat", amp="bf16", activation_checkpointing=True)
    remat.model.load_state_dict(plain.model.state_dict())
    remat.ema.model.load_state_dict(plain.ema.model.state_dict())
    for i in range(10):
        a, b = step_both(plain, remat, batch(i), seed=500 + i)
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-3, atol=1e-3, msg=f"step {i}")
    assert remat.train_step_fn.captures == 1 and remat.train_step_fn._graph is not None
    assert_trainers_close(plain, remat, rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("cuda_graphs", ["true", "false"])
def test_a_stopped_run_resumes_on_the_gpu_bit_for_bit(tmp_path, deterministic, cuda_graphs):
    """Stop mid-epoch, resume from the checkpoint on the GPU (its RNG states go back to
    the CPU generator and the GPU's), and end where the uninterrupted run ends: every
    tensor of the final checkpoint, and every logged loss."""
    common = dict(max_steps=8, deterministic=True, checkpoint_every=1000, eval_batches=1,
                  kl_anneal_portion=0.5, amp="bf16", cuda_graphs=cuda_graphs)
    full = trainer(tmp_path / "full", **common)
    full.fit()
    stopped = trainer(tmp_path / "stopped", **common)
    assert stopped.fit(stop_at_step=5)["stopped"]
    checkpoint = tmp_path / "stopped" / "runs" / "demo" / "checkpoint.pt"
    resumed = trainer(tmp_path / "stopped", resume=checkpoint, **common)
    assert resumed.step == 5
    resumed.fit()
    _assert_same_run(full.config, resumed.config)


def test_the_default_configuration_takes_the_fast_path(tmp_path, capsys):
    """No performance flag: bf16 autocast (the GPU has it), regional compile, the captured
    step; the run's first line says so."""
    loader = synthetic_loader()
    cfg = preset("demo", out=str(tmp_path / "runs"), **TINY)
    assert (cfg.amp, cfg.compile, cfg.cuda_graphs) == ("auto", "auto", "auto")
    run = Trainer(cfg, gpu(), progress=False, loaders=(loader, loader))
    expected_amp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert (run.config.amp, run.config.compile, run.config.cuda_graphs) == (
        expected_amp, "regional", "true")
    assert type(run.train_step_fn) is SyncFreeStep and run.train_step_fn.capture
    assert f"--amp auto -> {expected_amp}" in capsys.readouterr().err
