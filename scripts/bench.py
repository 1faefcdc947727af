"""Benchmark one training step and sampling: ms/step, images/s, peak memory.

    python scripts/bench.py --preset mnist --batch_size 32
    python scripts/bench.py --preset demo --batch_size 64 --threads 2

The step is the real one of training (forward, full loss with the spectral and
BatchNorm regularisers, backward, Adamax update) on synthetic data of the
preset's shape, so no dataset is needed.  Prints one JSON line, with two
device-independent counts of one (non-logging) step: aten compute ops
dispatched, and host syncs (``aten._local_scalar_dense``: ``.item()``,
``float(t)``, ``bool(t)``) outside ``torch.optim``.  On CUDA it adds
``gpu_busy_fraction``: the part of a step's wall time the GPU spends in kernels.

    python scripts/bench.py --preset cifar10 --batch_size 2 --num_channels_enc 16 \
        --num_channels_dec 16 --steps 2 --warmup 1 --op-report 25
    python scripts/bench.py --preset demo --compile regional --explain

Memory: ``resident_at_backward_gib`` is what a GPU holds when backward starts
(weights, EMA, Adamax state, buffers, and every tensor still alive: activations
kept for backward, the stacked weights, the batch), measured on the CPU without
doing the arithmetic: the step's forward and loss run on fake CUDA tensors
(``FakeTensorMode``), so bf16 / fp16 autocast follows the GPU's rules, and
celebahq256 at batch 4 takes seconds.  ``peak_memory_gib`` is the real peak
(``torch.cuda.max_memory_allocated`` on CUDA, the process's max RSS on the CPU).
``--memory-only`` prints just the fake measurement (no timing; any preset, any
batch, on any machine):

    python scripts/bench.py --preset celebahq256 --amp bf16 --activation_checkpointing true --memory-only

``--cuda_graphs true`` times the captured step (CUDA; elsewhere the run says why
it falls back): the counts are then what the host still dispatches per replayed
step, ``--kernels`` what the GPU runs, and ``graph_captures`` how many captures
the run made (1, or 2 when the KL balancing ended during the timed steps).

``--op-report N`` adds the N most frequent ops of the counted step;
``--compile MODE`` is the Config field (none, regional, full): ``first_step_s``
is then mostly compile time (``--backend aot_eager`` traces without generating
code), ``compiled_graphs`` what the first step compiled and
``recompiles_after_first_step`` what every later step added (0: none); ``--explain`` adds graph and graph-break counts of the model's forward
from ``torch._dynamo.explain`` (and, with ``regional``, of each compiled region
kind).  The op counter is a dispatch mode, under which dynamo runs compiled
regions eagerly, so it counts eager ops in every mode; ``--kernels`` counts
the kernels of one step with the profiler instead, compiled kernels included.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae import cli  # noqa: E402
from hvae.config import parse_args  # noqa: E402
from hvae.model import compile as compile_module  # noqa: E402
from hvae.runtime import Runtime  # noqa: E402
from hvae.training import Trainer  # noqa: E402

# Ops that move no data through a kernel (views, metadata): not counted as compute.
_NOT_COMPUTE = ("view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t",
                "as_strided", "detach", "alias", "unsqueeze", "squeeze", "slice", "select",
                "split", "chunk", "unbind", "split_with_sizes", "empty", "empty_like",
                "empty_strided", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
                "sym_storage_offset")

# Profiler events that are not kernels (host reads, views), or not when they have no aten child.
_NOT_KERNELS = ("_local_scalar_dense", "item", "flatten", "narrow", "view_as", "expand_as",
                "unflatten", "movedim", "swapaxes", "numpy_T", "lift_fresh_copy")
_MAYBE_NO_OP = ("to", "contiguous", "type_as", "float", "double", "half", "bfloat16")


class OpCounter(TorchDispatchMode):
    """Counts aten compute ops and host syncs dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.sync_sites, self.names = 0, 0, Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            stack = traceback.extract_stack()[:-1]
            if not any("torch/optim" in f.filename for f in stack):
                self.syncs += 1
                ours = [f for f in stack if "/torch/" not in f.filename] or stack
                self.sync_sites[f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"] += 1
        elif name not in _NOT_COMPUTE:
            self.ops += 1
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn) -> int:
    """Kernels one call of ``fn`` runs, from the profiler: top-level aten compute ops
    (not nested in another aten op; views excluded) plus compiled kernels
    (inductor's C++ / Triton kernels).  Unlike ``OpCounter`` it also sees inside
    compiled regions (dynamo runs them eagerly under a dispatch mode)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    with inductor_config.patch({"cpp.enable_kernel_profile": True}), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for e in prof.events():
        name = e.name[6:] if e.name.startswith("aten::") else None
        if name is None:
            count += "cpp_fused" in e.name or e.name.startswith("triton_")
            continue
        parent = e.cpu_parent.name if e.cpu_parent is not None else ""
        if parent.startswith("aten::") or name in _NOT_COMPUTE + _NOT_KERNELS:
            continue
        if name in _MAYBE_NO_OP and not any(c.name.startswith("aten::") for c in e.cpu_children):
            continue  # e.g. x.to(its own dtype): returns x, runs nothing
        count += 1
    return count


def gpu_busy_fraction(fn, device: torch.device) -> float:
    """Fraction of one call of ``fn``'s wall time during which the GPU runs a kernel
    (union of the profiler's kernel intervals / wall time).  Well below 1: the
    step is bound by launches and host work, not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    return covered_length(spans) / wall_us


def covered_length(spans) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


def synthetic_batches(config, num: int, device):
    shape = (config.batch_size, config.in_channels, config.image_size, config.image_size)
    g = torch.Generator().manual_seed(0)
    if config.binary:
        batches = [torch.bernoulli(torch.full(shape, 0.3), generator=g) for _ in range(num)]
    else:
        levels = 2 ** config.num_x_bits - 1
        batches = [torch.randint(0, levels + 1, shape, generator=g).float() / levels for _ in range(num)]
    return [b.to(device) for b in batches]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _LiveStorages(TorchDispatchMode):
    """Remembers (weakly) the storage of every tensor an op returns; ``live_bytes`` sums
    those still alive (views share their base's storage, counted once)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref, self.storages = StorageWeakRef, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage._cdata, (self._ref(storage), storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


class _BackwardStarts(Exception):
    """Raised in place of ``backward``: the measurement ends where backward would start."""


def resident_at_backward(config) -> dict:
    """GiB a CUDA device holds when the training step's backward starts (see the module
    docstring): one real ``TrainStep.forward_backward`` on fake CUDA tensors."""
    from unittest import mock

    from hvae import objectives
    from hvae.fake_cuda import fake_cuda
    from hvae.model import NVAE
    from hvae.model.remat import enable_activation_checkpointing
    from hvae.schedules import Schedule
    from hvae.step import GradSkipper, TrainStep

    def stop(*args, **kwargs):
        measured["live"] = tracker.live_bytes()
        raise _BackwardStarts

    # channels-last changes layouts, not sizes (and converting fake parameters fails)
    cfg, device, measured = config.replace(channels_last=False), torch.device("cuda"), {}
    with fake_cuda(), torch.device(device), mock.patch.object(torch.Tensor, "backward", stop):
        model = NVAE(cfg)
        enable_activation_checkpointing(model, cfg.activation_checkpointing)
        spectral = objectives.SpectralRegularizer(model, cfg.num_power_iter)
        spectral._initialized_on_host = True  # a later step's (its flag is a host read)
        optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.learning_rate)
        schedule = Schedule(cfg, total_steps=10**9, lr_warmup_steps=0)  # KL balancing on
        step = TrainStep(model, model, cfg, Runtime(device=device), schedule, optimizer, spectral,
                         None, GradSkipper(cfg.grad_skip_factor, device=device),
                         torch.amp.GradScaler("cuda", enabled=False))
        x = synthetic_batches(cfg.replace(batch_size=1), 1, "cpu")[0].to(device)
        x = x.expand(cfg.batch_size, *x.shape[1:]).contiguous()
        with (tracker := _LiveStorages()):
            try:
                step.forward_backward(x, 0)
            except _BackwardStarts:
                pass
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params, buffers = nbytes(model.parameters()), nbytes(model.buffers()) + nbytes(spectral.buffers())
    parts = {"weights": params + buffers,
             "ema": (params + buffers) if cfg.ema_decay > 0 else 0,
             "optimizer": 2 * params,        # Adamax: exp_avg and exp_inf
             "activations": measured["live"]}  # everything the step made that is still alive
    gib = {k: round(v / 2**30, 3) for k, v in parts.items()}
    return {"resident_at_backward_gib": round(sum(parts.values()) / 2**30, 3),
            "resident_parts_gib": gib, "resident_parts_bytes": parts}


def explain_counts(model, x) -> dict:
    """Graphs and graph breaks of the model's forward (and of each compiled region kind)."""
    from hvae.model.compile import regions

    def counts(fn, *args) -> dict:
        e = torch._dynamo.explain(fn)(*args)
        return {"graphs": e.graph_count, "breaks": e.graph_break_count,
                "break_reasons": [b.reason for b in e.break_reasons][:5]}

    model.train()
    out = {"forward": counts(model, x)}
    if model.config.compile == "regional":  # each kind of region with its real inputs
        seen, inputs = {}, {}
        hooks = [r.register_forward_pre_hook(lambda mod, args, kw: inputs.setdefault(id(mod), (args, kw)),
                                             with_kwargs=True) for r in regions(model)]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        for region in regions(model):
            kind = type(region).__name__
            if kind in seen or id(region) not in inputs:
                continue
            args, kw = inputs[id(region)]
            e = torch._dynamo.explain(type(region).forward)(region, *args, **kw)
            seen[kind] = {"graphs": e.graph_count, "breaks": e.graph_break_count}
        out["regions"] = seen
    return out


@cli.entry_point("bench.py")  # bad input (arguments, config, device): one line, exit code 2
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=cli.integer(1), default=10,
                        help="timed steps after warm-up")
    parser.add_argument("--warmup", type=cli.integer(0), default=3)
    parser.add_argument("--threads", type=cli.integer(0), default=0,
                        help="torch CPU threads (0: default)")
    parser.add_argument("--device", default=None, type=cli.DEVICE)
    parser.add_argument("--num-samples", type=cli.integer(1), default=16)
    parser.add_argument("--op-report", type=cli.integer(0), default=0, metavar="N",
                        help="also report the N most frequent ops of the counted step")
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend for --compile (default inductor; aot_eager: no codegen)")
    parser.add_argument("--kernels", action="store_true",
                        help="also count the kernels of one step with the profiler (sees compiled code)")
    parser.add_argument("--explain", action="store_true",
                        help="also report torch._dynamo.explain graph / break counts of the forward")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the fake-tensor measurement of the memory at backward start")
    config, args = parse_args(argv, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = resident_at_backward(config)
    if args.memory_only:
        print(json.dumps({"preset": config.preset, "batch_size": config.batch_size,
                          "amp": config.amp,
                          "activation_checkpointing": config.activation_checkpointing, **memory}))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.backend:
        compile_module.BACKEND = args.backend
    batches = synthetic_batches(config, 2, device)
    # a very long run keeps the schedules in their warm-up regime (KL balancing on)
    trainer = Trainer(config.replace(epochs=10**9, max_steps=0), Runtime(device=device),
                      progress=False, run_dir="/tmp/hvae-bench", loaders=(batches, batches))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # one step's micro-batches (--grad_accum_steps)
    micro = [[batches[(i + k) % 2] for k in range(config.grad_accum_steps)] for i in range(2)]
    times, graphs = [], []  # graphs: dynamo's count of compiled graphs after each step
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(micro[i % 2])
        sync()
        times.append(time.perf_counter() - t0)
        graphs.append(dynamo_counters["stats"]["unique_graphs"])
    step_s = statistics.median(times[args.warmup:] or times)
    counter = OpCounter()
    with counter:
        trainer.train_step(micro[0])
    kernels = count_kernels(lambda: trainer.train_step(micro[1])) if args.kernels else None
    busy = (gpu_busy_fraction(lambda: trainer.train_step(micro[1]), device)
            if device.type == "cuda" else None)
    model = trainer.eval_model.eval()
    with torch.no_grad():
        model.sample(args.num_samples)
        sync()
        t0 = time.perf_counter()
        model.sample(args.num_samples)
        sync()
        sample_s = time.perf_counter() - t0
    params = sum(p.numel() for p in trainer.model.parameters())
    report = {"preset": config.preset, "batch_size": config.batch_size,
              "device": str(device), "threads": torch.get_num_threads(),
              "amp": config.amp, "compile": config.compile, "params": params,
              "cuda_graphs": config.cuda_graphs,
              "graph_captures": getattr(trainer.train_step_fn, "captures", None),
              "backend": compile_module.BACKEND if config.compile != "none" else None,
              "ms_per_step": round(step_s * 1000, 1),
              "images_per_s": round(config.batch_size * config.grad_accum_steps / step_s, 2),
              "first_step_s": round(times[0], 2),
              "grad_accum_steps": config.grad_accum_steps,
              "activation_checkpointing": config.activation_checkpointing,
              "peak_memory_gib": round(peak_memory_gib(device), 3), **memory,
              f"sample_{args.num_samples}_s": round(sample_s, 3),
              "aten_ops_per_step": counter.ops, "host_syncs_per_step": counter.syncs,
              "host_sync_sites": dict(counter.sync_sites)}
    if config.compile != "none":  # every step after the first reuses what it compiled
        report["compiled_graphs"] = graphs[0]
        report["recompiles_after_first_step"] = graphs[-1] - graphs[0]
    if busy is not None:
        report["gpu_busy_fraction"] = round(busy, 3)
    if kernels is not None:
        report["kernels_per_step"] = kernels
    if args.op_report:
        report["top_ops"] = dict(counter.names.most_common(args.op_report))
    if args.explain:
        report["explain"] = explain_counts(trainer.model, batches[0])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
