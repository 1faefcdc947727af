"""The sync-free step behind ``--cuda_graphs``, on the CPU: the same training as the eager
step, no host read, skips that leave no trace, exact resume, checkpoints shared with the
eager step, and the capture / replay bookkeeping (with a stand-in for the CUDA graph)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hvae import graphed_step
from hvae import training as training_module
from hvae.checkpoint import load_checkpoint
from hvae.config import preset
from hvae.graphed_step import MaskedAdamax, SyncFreeStep, graph_blockers
from hvae.runtime import Runtime
from hvae.step import TrainStep
from hvae.training import Trainer, train

from test_training import TINY, bernoulli_batch, torchrun_environment


def tiny(tmp_path, **overrides):
    """test_training's tiny demo model, with an EMA (the sync-free step updates it)."""
    return preset("demo", out=str(tmp_path / "runs"), **{**TINY, "ema_decay": 0.9, **overrides})


def batch(seed: int, n: int = 16) -> torch.Tensor:
    return bernoulli_batch(n, seed)


@pytest.fixture
def sync_free_on_cpu(monkeypatch):
    """Let ``--cuda_graphs`` build the sync-free step on the CPU (uncaptured there)."""
    monkeypatch.setattr(training_module, "graph_blockers", lambda config, runtime: [])


def pair(tmp_path, loaders=None, **overrides) -> tuple[Trainer, Trainer]:
    """An eager and a sync-free trainer from the same initial weights."""
    cfg = tiny(tmp_path, **overrides)
    eager = Trainer(cfg, Runtime(), progress=False, loaders=loaders)
    synced = Trainer(cfg.replace(cuda_graphs=True), Runtime(), progress=False, loaders=loaders)
    synced.model.load_state_dict(eager.model.state_dict())
    synced.ema.model.load_state_dict(eager.ema.model.state_dict())
    assert type(eager.train_step_fn) is TrainStep and type(synced.train_step_fn) is SyncFreeStep
    return eager, synced


def step_both(eager: Trainer, synced: Trainer, x, seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    a = eager.train_step(x)
    torch.manual_seed(seed)
    b = synced.train_step(x)
    return a, b


def assert_trainers_close(eager: Trainer, synced: Trainer, rtol=1e-4, atol=1e-5) -> None:
    for part in ("model", "ema_model"):
        sa = (eager.model if part == "model" else eager.ema.model).state_dict()
        sb = (synced.model if part == "model" else synced.ema.model).state_dict()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=rtol, atol=atol, msg=f"{part}.{key}")


# ------------------------------------------------------------------ Adamax
def test_masked_adamax_is_torchs_adamax_and_a_skip_changes_nothing():
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (5, 4)]
    ref = [torch.randn(s, requires_grad=True) for s in shapes]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    kwargs = dict(lr=0.1, weight_decay=3e-4, eps=1e-3, foreach=True)
    torch_adamax = torch.optim.Adamax(ref, **kwargs)
    masked = MaskedAdamax(torch.optim.Adamax(ours, **kwargs), torch.device("cpu"))
    lr, take, skip = torch.tensor(0.1), torch.tensor(False), torch.tensor(True)
    for i in range(12):
        grads = [torch.randn(s) * (1 + i) for s in shapes]
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch_adamax.step()
        masked.step(lr, take)
        if i in (3, 7):  # a skipped update in between (NaN / inf gradients): no trace at all
            before = ([q.detach().clone() for q in ours],
                      [copy.deepcopy(masked.optimizer.state[q]) for q in ours], masked.count.clone())
            for q in ours:
                q.grad = torch.full_like(q, math.nan)
            ours[0].grad[0] = math.inf
            masked.step(lr, skip)
            for q, b in zip(ours, before[0]):
                assert torch.equal(q.detach(), b)
            for q, saved in zip(ours, before[1]):
                for key in ("exp_avg", "exp_inf"):
                    assert torch.equal(masked.optimizer.state[q][key], saved[key])
            assert torch.equal(masked.count, before[2])
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-6)
    assert int(masked.count) == 12
    # checkpoints keep torch's layout: every step count is the number of updates taken
    state = masked.optimizer.state_dict()
    assert all(float(s["step"]) == 12 for s in state["state"].values())
    for s, t in zip(state["state"].values(), torch_adamax.state_dict()["state"].values()):
        torch.testing.assert_close(s["exp_avg"], t["exp_avg"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s["exp_inf"], t["exp_inf"], rtol=1e-6, atol=1e-6)
    # and a loaded state sets the count (an eager run's checkpoint resumed sync-free)
    fresh = MaskedAdamax(torch.optim.Adamax([p.detach().clone().requires_grad_() for p in ref],
                                            **kwargs), torch.device("cpu"))
    fresh.optimizer.load_state_dict(torch_adamax.state_dict())
    assert int(fresh.count) == 12


def test_a_skipped_first_update_leaves_fresh_parameters_untouched():
    p = torch.zeros(4, requires_grad=True)
    masked = MaskedAdamax(torch.optim.Adamax([p], lr=1.0), torch.device("cpu"))
    p.grad = torch.full((4,), math.nan)
    masked.step(torch.tensor(1.0), torch.tensor(True))  # exp_inf is still 0 here: no 0/0
    assert torch.equal(p.detach(), torch.zeros(4)) and int(masked.count) == 0
    p.grad = torch.ones(4)
    masked.step(torch.tensor(1.0), torch.tensor(False))
    # first Adamax update: m = 0.1 g, u = |g| + eps, bias correction 1 - 0.9: step = -lr
    torch.testing.assert_close(p.detach(), torch.full((4,), -1 / (1 + 1e-8)), rtol=1e-6, atol=0)


# ------------------------------------------------------------- the step
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(amp="bf16"),
    dict(grad_accum_steps=2, batch_size=8, grad_clip=0.0),
    dict(amp="fp16"),
    dict(num_nf=1, dataset="cifar10", in_channels=3, image_size=32, binary=False,
         num_latent_scales=2, channels_last=False),
], ids=["fp32", "bf16", "accumulation", "fp16-scaler", "rgb-logistic-mixture-flows"])
def test_sync_free_step_trains_as_the_eager_step(tmp_path, sync_free_on_cpu, overrides):
    # a small learning rate: the two Adamax roundings differ in the last bit, and a large
    # one amplifies that into visible differences within a few steps (bf16 most)
    rgb = overrides.get("in_channels") == 3
    loaders = (([torch.rand(2, 16, 3, 32, 32).round(decimals=2)[i] for i in range(2)],) * 2
               if rgb else None)
    eager, synced = pair(tmp_path, learning_rate=2e-3, loaders=loaders, **overrides)
    n, taken = eager.config.batch_size, 0
    half = eager.config.amp != "none"
    tolerance = dict(rtol=1e-3, atol=1e-3) if half else dict(rtol=1e-4, atol=1e-5)
    # fp16: the loss scale starts at 2^16 and halves at each overflow before updates begin
    for i in range(14 if eager.config.amp == "fp16" else 6):
        x = eager.train_loader[i % 2] if rgb else batch(i, 16)
        x = x if eager.accum == 1 else [x[:n], x[n:]]
        a, b = step_both(eager, synced, x, seed=100 + i)
        assert bool(a["skipped"]) == bool(b["skipped"])  # fp16: overflows at the first scales
        taken += not bool(b["skipped"])
        for key in ("loss", "nelbo", "kl", "grad_norm", "lr", "kl_weight", "reg"):
            torch.testing.assert_close(torch.as_tensor(b[key]).float(),
                                       torch.as_tensor(a[key]).float(), equal_nan=True,
                                       msg=key, **tolerance)
    # fp32 pins the update (a wrong Adamax term moves weights by ~lr = 2e-3); half precision
    # rounds the two runs' last-bit differences apart, so it checks the plumbing only
    assert_trainers_close(eager, synced, rtol=1e-4, atol=5e-4 if half else 1e-5)
    assert taken >= 3
    if eager.scaler.is_enabled():
        assert eager.scaler.get_scale() == synced.scaler.get_scale() < 2.0**16


class _CaptureHazards(TorchDispatchMode):
    """Ops that read the device on the host, or copy host data in: a capture forbids them."""
    FORBIDDEN = {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "unique",
                 "_unique2", "item"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN or (name == "repeat_interleave"
                                      and (kwargs or {}).get("output_size") is None):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [dict(), dict(amp="fp16", num_nf=1)],
                         ids=["fp32", "fp16-flows"])
def test_the_sync_free_step_reads_nothing_back(tmp_path, sync_free_on_cpu, overrides):
    """Zero host syncs, and nothing a CUDA-graph capture forbids, in the whole step."""
    _, synced = pair(tmp_path, **overrides)
    # until an update is taken (fp16: the first loss scales overflow), the step reads the
    # decision once, to repeat the regulariser's longer first call after a skip
    for i in range(20):
        if not bool(synced.train_step(batch(i))["skipped"]):
            break
    assert synced.spectral.settled
    hazards = _CaptureHazards()
    with hazards:
        synced.train_step(batch(20))
    assert hazards.found == []


def test_a_skipped_sync_free_step_leaves_no_trace(tmp_path, sync_free_on_cpu):
    _, trainer = pair(tmp_path)
    trainer.train_step(batch(0))
    before = {"model": copy.deepcopy(trainer.model.state_dict()),
              "ema": copy.deepcopy(trainer.ema.model.state_dict()),
              "spectral": copy.deepcopy(trainer.spectral.state_dict()),
              "optimizer": copy.deepcopy(trainer.optimizer.state_dict())}
    bad = batch(1)
    bad[0, 0, 5, 5] = math.nan
    metrics = trainer.train_step(bad)
    assert torch.is_tensor(metrics["skipped"]) and bool(metrics["skipped"])
    assert int(metrics["skipped_total"]) == 1
    after = {"model": trainer.model.state_dict(), "ema": trainer.ema.model.state_dict(),
             "spectral": trainer.spectral.state_dict()}
    for part, state in after.items():  # BatchNorm counts and power-iteration vectors included
        for key, value in state.items():
            assert torch.equal(value, before[part][key]), (part, key)
    optimizer = trainer.optimizer.state_dict()
    for s, t in zip(optimizer["state"].values(), before["optimizer"]["state"].values()):
        for key in s:
            assert torch.equal(torch.as_tensor(s[key]), torch.as_tensor(t[key])), key
    assert not bool(trainer.train_step(batch(2))["skipped"])


def _train_losses(cfg) -> dict[int, float]:
    rows = [json.loads(l) for l in
            (Path(cfg.out) / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_sync_free_runs_resume_exactly_and_share_checkpoints_with_eager_runs(
        tmp_path, sync_free_on_cpu):
    common = dict(max_steps=6, deterministic=True, checkpoint_every=1000, cuda_graphs=True,
                  eval_batches=1)
    straight = tiny(tmp_path / "a", **common)
    train(straight, progress=False)
    stopped = tiny(tmp_path / "b", **common)
    assert train(stopped, progress=False, stop_at_step=3)["stopped"]
    ckpt = Path(stopped.out) / stopped.run_name / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert all(float(s["step"]) == 3 for s in state["optimizer"]["state"].values())
    train(stopped, progress=False, resume=ckpt)
    a = load_checkpoint(Path(straight.out) / straight.run_name / "checkpoint.pt")
    b = load_checkpoint(ckpt)
    for part in ("model", "ema", "spectral", "grad_skip"):
        for key in a[part]:
            torch.testing.assert_close(b[part][key], a[part][key], rtol=0, atol=0,
                                       equal_nan=True, msg=f"{part}.{key}")
    assert _train_losses(straight) == _train_losses(stopped)
    # the same checkpoint resumed by the eager step continues the same training
    eager = Trainer(tiny(tmp_path / "b", **{**common, "cuda_graphs": False}), Runtime(),
                    progress=False, resume=tmp_path / "b" / "runs" / stopped.run_name / "checkpoint.pt")
    assert type(eager.train_step_fn) is TrainStep
    assert all(s["step"].device.type == "cpu" for s in eager.optimizer.state.values())


@pytest.mark.parametrize("overrides", [
    dict(), dict(num_nf=1), dict(res_dist=False), dict(kl_mc=True),
    dict(dataset="cifar10", in_channels=3, image_size=32, binary=False, num_latent_scales=2)],
    ids=["demo", "flows", "plain-posterior", "mc-kl", "logistic-mixture"])
def test_every_parameter_gets_a_gradient(tmp_path, overrides):
    """The sync-free step updates every parameter (its gradients are one preallocated
    buffer), as torch's Adamax does those with a gradient: they must be the same set."""
    trainer = Trainer(tiny(tmp_path, **overrides), Runtime(), progress=False,
                      loaders=([torch.rand(4, overrides.get("in_channels", 1),
                                           overrides.get("image_size", 28),
                                           overrides.get("image_size", 28)).round()] * 2,) * 2)
    trainer.train_step_fn.forward_backward(trainer.train_loader[0], 0)
    assert [n for n, p in trainer.model.named_parameters() if p.grad is None] == []


def test_cuda_graphs_on_the_cpu_fall_back_to_eager_steps_and_say_why(tmp_path, capsys):
    trainer = Trainer(tiny(tmp_path, cuda_graphs=True), Runtime(), progress=False)
    assert type(trainer.train_step_fn) is TrainStep
    assert "--cuda_graphs: taking eager steps instead: CUDA graphs need a CUDA device" \
        in capsys.readouterr().err
    cuda = Runtime(device=torch.device("cuda", 0))
    assert graph_blockers(tiny(tmp_path), cuda) == []
    reasons = graph_blockers(tiny(tmp_path, activation_checkpointing=True),
                             Runtime(rank=0, world_size=2, device=torch.device("cuda", 0)))
    assert len(reasons) == 1 and "checkpointing" in reasons[0]  # torchrun does not block


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(amp="bf16"),
    dict(amp="fp16", num_nf=1, grad_accum_steps=2, batch_size=8),
], ids=["fp32", "bf16", "fp16-flows-accumulation"])
def test_the_sync_free_step_keeps_every_tensor_on_the_gpu(tmp_path, monkeypatch, overrides):
    """The sync-free step, backward aside, on fake CUDA tensors (``hvae.fake_cuda``),
    through warm-up, a stand-in capture and replays: an op that meets a CPU tensor (other
    than a plain number) fails, and so does a read of a value.  On the CPU, where every
    tensor is a CPU tensor, the other tests cannot see a tensor left behind on the host."""
    from torch._subclasses.fake_tensor import FakeCopyMode

    from hvae import objectives
    from hvae.fake_cuda import fake_cuda, grad_scaler
    from hvae.model import NVAE
    from hvae.schedules import Schedule
    from hvae.step import EMA, GradSkipper

    def capture(fn, device):  # runs the step once; the replays do nothing (fake tensors)
        out = fn()
        return type("Graph", (), {"replay": lambda self: None})(), out

    monkeypatch.setattr(graphed_step, "capture_graph", capture)
    monkeypatch.setattr(graphed_step, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *args, **kwargs: None)
    cfg = tiny(tmp_path, channels_last=False, **overrides)  # fake parameters stay channels-first
    device = torch.device("cuda", 0)
    with fake_cuda() as mode:
        with torch.device(device):  # fake parameters cannot be moved: made on the device
            model = NVAE(cfg)
            spectral = objectives.SpectralRegularizer(model, cfg.num_power_iter)
            with FakeCopyMode(mode):
                ema = EMA(model, cfg.ema_decay)
        spectral._initialized_on_host = True  # settled: reading the buffer is a host read
        # from here the default device is the CPU, as in a run
        step = SyncFreeStep(
            model, model, cfg, Runtime(device=device), Schedule(cfg, 100, lr_warmup_steps=0),
            torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate, foreach=True),
            spectral, ema, GradSkipper(cfg.grad_skip_factor, device=device),
            grad_scaler(enabled=cfg.amp == "fp16"), capture=True)
        x = torch.rand(16, 1, 28, 28, device="cpu").round()  # a host batch, as from a loader
        x = x if cfg.grad_accum_steps == 1 else list(x.chunk(2))
        for i in range(graphed_step.WARMUP_STEPS + 2):
            metrics = step(x, i)
    assert step.captures == 1
    assert {v.device for v in metrics.values() if torch.is_tensor(v)} == {device}


# ------------------------------------------------------------------------- DDP
DDP_STEPS = 5
RANK1_SKIPS = [False, True, True, False, True]  # rank 1's skipper below, patience 2
STOP_AT = 3                                      # rank 0 alone is asked to stop here


def _ddp_decisions_worker(rank, port, cfg_dict, batches, sync_free, out_file):
    """One of 2 gloo ranks: ``DDP_STEPS`` steps where only rank 1 decides to skip (its
    skipper calls every update after the first an outlier, patience 2) and only rank 0
    is asked to stop, at ``STOP_AT``."""
    torchrun_environment(rank, 2, port)
    from hvae.config import Config
    from hvae.training import init_runtime
    if sync_free:  # the sync-free step, uncaptured (capture needs CUDA)
        training_module.graph_blockers = lambda config, runtime: []
    cfg = Config.from_dict(cfg_dict).replace(cuda_graphs=sync_free)
    loader = [m for x in batches[rank] for m in (x if isinstance(x, list) else [x])]
    trainer = Trainer(cfg, init_runtime("cpu"), progress=False, loaders=(loader, loader))
    assert type(trainer.train_step_fn) is (SyncFreeStep if sync_free else TrainStep)
    if rank == 1:
        trainer.skipper.warmup, trainer.skipper.factor, trainer.skipper.patience = 1, 1e-9, 2
    torch.manual_seed(100 + rank)
    steps = []
    for i, x in enumerate(batches[rank]):
        m = trainer.train_step(x, stop_requested=rank == 0 and i == STOP_AT)
        steps.append({"skipped": bool(m["skipped"]), "stop": m["stop"], "loss": float(m["loss"])})
    # BatchNorm statistics are each rank's own (DDP without SyncBatchNorm): not compared
    params = lambda model: {n: p.detach() for n, p in model.named_parameters()}  # noqa: E731
    torch.save({"steps": steps, "weights": params(trainer.model),
                "ema": params(trainer.ema.model), "skipper": trainer.skipper.state_dict()},
               f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 2], ids=["one_batch", "accumulation"])
def test_ddp_ranks_agree_on_skips_and_stops_in_both_steps(tmp_path, accum):
    """Under DDP (2 gloo processes) one rank's skip decision, and one rank's stop request,
    bind every rank, in the eager and the sync-free step alike.  The sync-free step agrees
    on the skip on the device; without that, the ranks' weights part at the first skip.
    Both steps then train alike, also with 2 micro-batches per step (DDP's no_sync on the
    first, with the sync-free step's flat gradient buffer)."""
    from test_training import _free_port
    cfg = tiny(tmp_path, learning_rate=2e-3, batch_size=8 // accum, grad_accum_steps=accum)
    batches = [[bernoulli_batch(8, seed=10 * r + i) for i in range(DDP_STEPS)] for r in range(2)]
    if accum == 2:
        batches = [[list(x.chunk(2)) for x in rank] for rank in batches]
    runs = {}
    for sync_free in (False, True):
        out = tmp_path / f"ddp-{sync_free}"
        torch.multiprocessing.start_processes(
            _ddp_decisions_worker, args=(_free_port(), cfg.to_dict(), batches, sync_free, str(out)),
            nprocs=2, start_method="spawn")
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
        for r in ranks:
            assert [s["skipped"] for s in r["steps"]] == RANK1_SKIPS
            assert [s["stop"] for s in r["steps"]] == [i == STOP_AT for i in range(DDP_STEPS)]
        for part in ("weights", "ema", "skipper"):
            for key, value in ranks[0][part].items():
                torch.testing.assert_close(value, ranks[1][part][key], rtol=0, atol=0,
                                           equal_nan=True, msg=f"{sync_free} {part}.{key}")
        runs[sync_free] = ranks[0]
    for part in ("weights", "ema"):
        for key, value in runs[False][part].items():
            torch.testing.assert_close(runs[True][part][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{part}.{key}: {m}")
    losses = [[s["loss"] for s in runs[k]["steps"]] for k in (False, True)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)


class _NeverReplayed:
    """A graph no rank may replay: another rank's capture failed, so their all-reduces
    would not pair up."""

    def replay(self):
        raise AssertionError("replayed a graph that another rank could not capture")


def _ddp_capture_worker(rank, port, cfg_dict, batches, out_file):
    """One of 2 gloo ranks taking the sync-free step with capture on (as on a GPU).  The
    capture stands in for CUDA's: it runs nothing, succeeds on rank 0 and fails on
    rank 1."""
    torchrun_environment(rank, 2, port)
    from hvae.config import Config
    from hvae.training import init_runtime
    training_module.graph_blockers = lambda config, runtime: []
    losses, attempts = [], []

    def capture(fn, device):
        attempts.append(len(losses))
        if rank == 1:
            raise RuntimeError("operation not permitted when stream is capturing\n(details)")
        return _NeverReplayed(), None

    graphed_step.capture_graph = capture
    cfg = Config.from_dict(cfg_dict).replace(cuda_graphs=True)
    trainer = Trainer(cfg, init_runtime("cpu"), progress=False,
                      loaders=(batches[rank], batches[rank]))
    trainer.train_step_fn.capture = True  # as on a GPU
    torch.manual_seed(100 + rank)
    for x in batches[rank]:
        losses.append(float(trainer.train_step(x)["loss"]))
    torch.save({"attempts": attempts, "capture": trainer.train_step_fn.capture,
                "weights": {n: p.detach() for n, p in trainer.model.named_parameters()}},
               f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


def test_under_ddp_every_rank_replays_or_none_does(tmp_path, capfd):
    """DDP warms up for 11 steps before a capture (PyTorch's CUDA notes), and when one
    rank cannot capture its step, no rank replays: all go on uncaptured, in step."""
    from test_training import _free_port
    steps = graphed_step.DDP_WARMUP_STEPS + 2
    cfg = tiny(tmp_path, learning_rate=2e-3, batch_size=8, max_steps=steps)
    batches = [[bernoulli_batch(8, seed=10 * r + i) for i in range(steps)] for r in range(2)]
    out = tmp_path / "ddp-capture"
    torch.multiprocessing.start_processes(
        _ddp_capture_worker, args=(_free_port(), cfg.to_dict(), batches, str(out)),
        nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in ranks:
        assert r["attempts"] == [graphed_step.DDP_WARMUP_STEPS] and r["capture"] is False
    for key, value in ranks[0]["weights"].items():
        torch.testing.assert_close(value, ranks[1]["weights"][key], rtol=0, atol=0, msg=key)
    err = capfd.readouterr().err
    assert "capturing the step failed (another rank could not capture its step)" in err
    assert "capturing the step failed (operation not permitted" in err


# ------------------------------------------------- capture and replay bookkeeping
def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class _RecordedGraph(TorchDispatchMode):
    """A CPU model of a CUDA graph, down to what a replay does not do.

    Capture records every aten op the step dispatches, backward's included, with its
    arguments: the same tensor objects, and Python numbers baked in as they were.  A
    replay runs those ops again and writes each result into the tensor the capture
    produced, as a graph's kernels write into its private memory.  No Python runs during
    a replay: a value computed on the host, or a tensor that Python rebinds rather than
    updates in place, stays as captured, exactly the bugs a real graph would have.
    Capturing an op that reads the device from the host fails, as a real capture does.
    Unlike a real capture, which runs nothing, this one runs the step, so the first
    replay after it does nothing."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.replays = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _CaptureHazards.FORBIDDEN:
            raise RuntimeError(f"operation not permitted when stream is capturing: {func}")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        self.replays += 1
        if self.replays == 1:
            return
        with torch._C._AutoDispatchBelowADInplaceOrView():  # kernels only, as recorded
            for func, args, kwargs, out in self.ops:
                fresh = func(*args, **kwargs)
                for old, new in zip(tree_leaves(out), tree_leaves(fresh)):
                    if torch.is_tensor(old) and not _same_memory(old, new):
                        old.copy_(new)


@pytest.fixture
def recorded_graphs(monkeypatch) -> list[_RecordedGraph]:
    """Captures become ``_RecordedGraph``s (listed here, in order); no side streams."""
    graphs = []

    def capture(fn, device):
        graph = _RecordedGraph()
        with graph:
            out = fn()
        graphs.append(graph)
        return graph, out

    monkeypatch.setattr(graphed_step, "capture_graph", capture)
    monkeypatch.setattr(graphed_step, "side_stream", lambda device: contextlib.nullcontext())
    return graphs


@pytest.mark.parametrize("overrides", [dict(), dict(grad_accum_steps=2, batch_size=8),
                                       dict(amp="bf16")], ids=["fp32", "accumulation", "bf16"])
def test_capture_replay_bookkeeping(tmp_path, sync_free_on_cpu, recorded_graphs, overrides):
    """Warm-up steps, one capture, replays on copied-in batches, a new capture when KL
    balancing ends, eager steps for another batch shape: the same training as eager,
    with replays that run only what was captured (``_RecordedGraph``)."""
    graphs = recorded_graphs
    eager, synced = pair(tmp_path, max_steps=12, kl_anneal_portion=0.5, kl_const_portion=0.0,
                         learning_rate=2e-3, **overrides)
    tolerance = dict(rtol=1e-3, atol=1e-3) if eager.config.amp != "none" else dict(rtol=1e-4,
                                                                                   atol=1e-5)
    switch = next(i for i in range(12) if not eager.schedule.balancing(i))  # balancing ends
    assert 4 <= switch <= 8
    synced.train_step_fn.capture = True  # as on a GPU
    for i in range(12):
        x = batch(i, 8 if i == 9 else 16)  # step 9: another batch shape runs eagerly
        x = list(x.chunk(2)) if eager.accum == 2 else x
        a, b = step_both(eager, synced, x, seed=200 + i)
        torch.testing.assert_close(b["loss"], a["loss"], msg=f"step {i}", **tolerance)
        torch.testing.assert_close(torch.as_tensor(b["kl_weight"]), torch.tensor(a["kl_weight"]),
                                   rtol=1e-6, atol=0)
    step = synced.train_step_fn
    assert step.captures == 2 and len(graphs) == 2
    # steps 0-2 warm up; step 3 is captured and replayed until balancing ends; then one
    # capture for the rest, whose replays skip step 9 (eager: another batch shape)
    assert [g.replays for g in graphs] == [switch - 3, 12 - switch - 1]
    assert_trainers_close(eager, synced, rtol=1e-4,
                          atol=5e-4 if eager.config.amp != "none" else 1e-5)


def test_evaluation_releases_the_graph_and_training_captures_again(
        tmp_path, sync_free_on_cpu, recorded_graphs):
    """fit() with a graph that replays what it captured: each evaluation gives the graph
    back (its memory is evaluation's), the next step captures again without warm-up,
    and the run ends where an eager run ends."""
    captured = recorded_graphs
    images = torch.cat([batch(i) for i in range(3)])  # 3 steps per epoch, an evaluation after each
    batches = torch.utils.data.DataLoader(images, batch_size=16, drop_last=True)
    common = dict(max_steps=9, kl_anneal_portion=0.0, learning_rate=2e-3, eval_batches=1,
                  checkpoint_every=1000)
    eager = Trainer(tiny(tmp_path / "a", **common), Runtime(), progress=False,
                    loaders=(batches, batches))
    graphed = Trainer(tiny(tmp_path / "b", cuda_graphs=True, **common), Runtime(),
                      progress=False, loaders=(batches, batches))
    graphed.model.load_state_dict(eager.model.state_dict())
    graphed.ema.model.load_state_dict(eager.ema.model.state_dict())
    graphed.train_step_fn.capture = True  # as on a GPU
    torch.manual_seed(5)
    a = eager.fit()
    torch.manual_seed(5)
    b = graphed.fit()
    # steps 0-2 warm up; evaluations after steps 3 and 6 release the graph; captures at
    # steps 3 and 6, replayed on 4-5 and on 7-8 (the first replay runs nothing)
    assert graphed.train_step_fn.captures == 2 and [g.replays for g in captured] == [3, 3]
    assert graphed.train_step_fn._graph is None  # the final evaluation released it too
    torch.testing.assert_close(b["test_nelbo"], a["test_nelbo"], rtol=1e-4, atol=0)
    assert_trainers_close(eager, graphed, rtol=1e-4, atol=1e-5)


def test_check_script_compares_the_two_steps(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "check_cuda_graphs.py"), "--preset", "demo",
         "--batch_size", "4", "--num_channels_enc", "8", "--num_channels_dec", "8",
         "--steps", "2", "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["steps"] == 3 and report["captured"] is False
    assert report["max_loss_rel_diff"] < 1e-5 and report["learning_rate"] == 2e-3


def test_cudnn_autotunes_on_cuda_unless_deterministic(monkeypatch):
    from hvae.runtime import configure_backends
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"), deterministic=False)
    assert torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda", 0), deterministic=False)
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on: None)
    configure_backends(torch.device("cuda", 0), deterministic=True)
    assert torch.backends.cudnn.benchmark is False


def test_grad_skipper_state_advances_under_replay():
    """The skipper's history, counts and streak of outliers are updated in place, so a
    captured decision keeps deciding as an eager one (the same norms, the same skips)."""
    from hvae.step import GradSkipper
    values = [1.0, 1.2, 0.9, 1000.0, 1000.0, 1000.0, 1.1, math.nan, 1.0, 500.0, 1.0]
    eager = GradSkipper(factor=10, warmup=3, patience=2)
    expected = []
    for v in values:
        skip = eager.decide(torch.tensor(v), torch.tensor(1.0))
        eager.record(torch.tensor(v), skip)
        expected.append(bool(skip))
    captured = GradSkipper(factor=10, warmup=3, patience=2)
    norm, loss = torch.tensor(values[0]), torch.tensor(1.0)
    graph = _RecordedGraph()
    with graph:
        skip = captured.decide(norm, loss)
        captured.record(norm, skip)
    graph.replay()  # the capture ran the first decision
    decisions = [bool(skip)]
    for v in values[1:]:
        norm.fill_(v)
        graph.replay()
        decisions.append(bool(skip))
    assert decisions == expected and True in expected and expected.count(True) < 5
    for a, b in zip(eager.state_dict().values(), captured.state_dict().values()):
        torch.testing.assert_close(b, a, equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------- on a real GPU (skipped here)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_pair(tmp_path, **overrides) -> tuple[Trainer, Trainer]:
    """An eager and a captured trainer on the GPU, from the same weights."""
    device = torch.device("cuda", 0)
    cfg = tiny(tmp_path, learning_rate=2e-3, **overrides)
    eager = Trainer(cfg, Runtime(device=device), progress=False)
    graphed = Trainer(cfg.replace(cuda_graphs=True), Runtime(device=device), progress=False)
    graphed.model.load_state_dict(eager.model.state_dict())
    graphed.ema.model.load_state_dict(eager.ema.model.state_dict())
    assert type(graphed.train_step_fn) is SyncFreeStep and graphed.train_step_fn.capture
    return eager, graphed


@cuda
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_a_captured_step_trains_as_the_eager_step_on_a_gpu(tmp_path, amp):
    eager, graphed = cuda_pair(tmp_path, amp=amp)
    half, taken = amp != "none", 0
    for i in range(24 if amp == "fp16" else 10):
        a, b = step_both(eager, graphed, batch(i).cuda(), seed=300 + i)
        assert bool(a["skipped"]) == bool(b["skipped"]), i
        taken += not bool(b["skipped"])
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-2 if half else 1e-4,
                                   atol=1e-3, equal_nan=True, msg=f"step {i}")
    step = graphed.train_step_fn
    assert taken >= 5 and step.captures == 1 and step._graph is not None
    assert_trainers_close(eager, graphed, rtol=1e-3, atol=5e-3 if half else 1e-4)


@cuda
def test_a_captured_step_skips_a_nan_batch_without_a_trace_on_a_gpu(tmp_path):
    _, graphed = cuda_pair(tmp_path)
    for i in range(6):  # warm-up, capture, replays
        graphed.train_step(batch(i).cuda())
    assert graphed.train_step_fn.captures == 1
    before = copy.deepcopy(graphed.model.state_dict())
    ema_before = copy.deepcopy(graphed.ema.model.state_dict())
    bad = batch(6).cuda()
    bad[0, 0, 5, 5] = math.nan
    metrics = graphed.train_step(bad)
    assert bool(metrics["skipped"]) and int(metrics["skipped_total"]) == 1
    for key, value in graphed.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in graphed.ema.model.state_dict().items():
        assert torch.equal(value, ema_before[key]), key
    assert not bool(graphed.train_step(batch(7).cuda())["skipped"])


def test_step_counts_loaded_onto_a_gpu_go_back_to_the_cpu():
    """torch's foreach Adamax reads each step count on the host: counts left on a GPU by
    ``map_location`` would cost one sync per parameter per step."""
    from hvae.step import step_counts_on_host

    class SaysGpu(torch.Tensor):  # a CPU tensor that reports a CUDA device
        __torch_function__ = torch._C._disabled_torch_function_impl

        @property
        def device(self):
            return torch.device("cuda", 0)

    p = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adamax([p])
    p.grad = torch.ones(3)
    optimizer.step()
    optimizer.state[p]["step"] = torch.Tensor._make_subclass(SaysGpu, torch.tensor(5.0).double())
    step_counts_on_host(optimizer)
    step = optimizer.state[p]["step"]
    assert type(step) is torch.Tensor and step.dtype == torch.float32 and float(step) == 5.0
