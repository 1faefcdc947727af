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
from hvae.config import RUN_ONLY, check_flags_matter, explicit_overrides, parse_args, preset  # noqa: E402
from hvae.memory import resident_at_backward  # noqa: E402
from hvae.model import compile as compile_module  # noqa: E402
from hvae.runtime import Runtime, resolve_compile  # noqa: E402
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


MAX_SETTLING_STEPS = 60  # warm-up steps added while updates are skipped (fp16 loss scale)


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


# Kernel kinds, decided from the aten ops that launched a kernel (innermost first).
_KINDS = (("batchnorm", ("batch_norm",)), ("grad scaler", ("_amp_",)),
          ("foreach (optimiser, EMA, gradients)", ("_foreach_",)),
          ("matmul", ("mm", "addmm", "bmm", "linear", "matmul")),
          ("copies", ("copy_", "_to_copy", "cat", "clone", "contiguous", "stack", "index",
                      "gather", "scatter", "masked_fill", "fill_", "zero_", "constant_pad_nd")),
          ("reductions", ("sum", "mean", "norm", "linalg_vector_norm", "amax", "amin", "max",
                          "min", "sort", "var", "std", "logsumexp", "_softmax", "_log_softmax",
                          "cumsum", "prod", "any", "all", "nansum")))
# ... and from the kernel's own name where no launching op was seen (compiled kernels)
_NAME_KINDS = (("elementwise (fused)", "triton_poi"), ("reductions (fused)", "triton_red"),
               ("reductions (fused)", "triton_per"), ("convolution", "conv"),
               ("convolution", "xmma"), ("convolution", "cudnn"), ("batchnorm", "bn_"),
               ("batchnorm", "batch_norm"), ("foreach (optimiser, EMA, gradients)", "multi_tensor"),
               ("matmul", "gemm"), ("matmul", "cutlass"), ("reductions", "reduce"),
               ("copies", "copy"), ("copies", "cat"))


def _conv_kind(chain) -> str | None:
    """'convolution depthwise 5x5 forward' etc. from the weight shape of the conv op in
    ``chain`` [(op name, input shapes)], or None when no conv op launched the kernel."""
    for name, shapes in chain:
        base = name.split("::")[-1]
        if base in ("convolution", "_convolution", "cudnn_convolution", "convolution_backward",
                    "_conv_depthwise2d", "conv2d", "mkldnn_convolution"):
            backward = any(n.endswith("convolution_backward") for n, _ in chain)
            w = shapes[2] if base == "convolution_backward" else shapes[1] if len(shapes) > 1 else []
            x = shapes[1] if base == "convolution_backward" else shapes[0] if shapes else []
            if len(w) != 4:
                return "convolution " + ("backward" if backward else "forward")
            depthwise = w[1] == 1 and len(x) == 4 and x[1] == w[0] and w[0] > 1
            size = f"{w[2]}x{w[3]}"
            return (f"convolution {'depthwise ' if depthwise else ''}{size} "
                    f"{'backward' if backward else 'forward'}")
    return None


def _kind_of(chain, kernel: str) -> str:
    conv = _conv_kind(chain)
    if conv:
        return conv
    for name, _ in chain:
        base = name.split("::")[-1]
        for kind, ops in _KINDS:
            if any(base == op or (op.endswith("_") and base.startswith(op)) or
                   (op == "batch_norm" and op in base) for op in ops):
                return kind
    for kind, fragment in _NAME_KINDS:
        if fragment in kernel.lower():
            return kind
    return "elementwise" if chain else "other"


def kernel_times(fn, device: torch.device) -> dict:
    """GPU kernels of one call of ``fn``: {kernel name: {kind: microseconds}}.  Each
    kernel's time is split over kinds by the aten ops that launched it (a captured
    replay launches no ops: its kernels get their name's kind, or "other")."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = prof.events()
    split: dict = {}  # kernel name -> {kind: us} as launched by aten ops
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not getattr(e, "kernels", None):
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None:
            chain.append((parent.name, [list(s) for s in (parent.input_shapes or [])
                                        if isinstance(s, (list, tuple))]))
            parent = parent.cpu_parent
        for k in e.kernels:
            kind = _kind_of(chain, k.name)
            slot = split.setdefault(k.name, {})
            slot[kind] = slot.get(kind, 0.0) + k.duration
    times: dict = {}
    for e in events:  # every kernel the GPU ran, claimed by an op or not
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.end - e.time_range.start
        kinds = split.get(e.name) or {_kind_of([], e.name): 1.0}
        weight = sum(kinds.values())
        slot = times.setdefault(e.name, {})
        for kind, t in kinds.items():
            slot[kind] = slot.get(kind, 0.0) + us * t / weight
    return times


def kernel_profile(eager_times: dict, step_times: dict, top: int = 15) -> dict:
    """Kernel time of one step by kind and its ``top`` kernels (ms).  ``step_times`` is the
    profiled step (captured or not), ``eager_times`` an uncaptured step of the same
    configuration: each kernel's time in the step is split over kinds as the eager
    step's launching ops split it (the kernels are the same; a replay has no ops)."""
    kinds: dict = {}
    totals = []
    for name, split in step_times.items():
        total = sum(split.values())
        totals.append((total, name))
        reference = eager_times.get(name) or split
        if set(reference) == {"other"}:
            reference = {_kind_of([], name): 1.0}
        weight = sum(reference.values())
        for kind, t in reference.items():
            kinds[kind] = kinds.get(kind, 0.0) + total * t / weight
    totals.sort(reverse=True)
    ms = lambda us: round(us / 1000, 3)  # noqa: E731
    return {"kernel_ms": ms(sum(t for t, _ in totals)), "kernels": len(totals),
            "by_kind_ms": {k: ms(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:120], ms(t)] for t, name in totals[:top]]}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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


TIMING_ONLY = {"steps": None, "warmup": None, "device": None, "num_samples": None,
               "op_report": 0, "backend": None, "kernels": False, "explain": False}


def check_args(config, args) -> None:
    """Refuse a flag this run would ignore, and a compile backend torch does not have."""
    unused = {name: "bench.py times the step on synthetic data (no dataset, no run folder)"
              for name in RUN_ONLY}
    check_flags_matter(config, explicit_overrides(args), preset(config.preset), unused)
    if args.memory_only:
        for dest, default in TIMING_ONLY.items():
            if getattr(args, dest) != default:
                raise cli.UsageError(f"--{dest.replace('_', '-')} does nothing with --memory-only "
                                     "(no step is timed)")
    if args.backend is not None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if resolve_compile(config.compile, device)[0] == "none":
            raise cli.UsageError("--backend does nothing without --compile regional or full")
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.backend not in backends:
            raise cli.UsageError(f"--backend {args.backend!r} is not a torch.compile backend: "
                                 f"one of {', '.join(backends)}")
    args.steps = 10 if args.steps is None else args.steps
    args.warmup = 3 if args.warmup is None else args.warmup
    args.num_samples = 16 if args.num_samples is None else args.num_samples


@cli.entry_point("bench.py")  # bad input (arguments, config, device): one line, exit code 2
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=cli.integer(1), default=None,
                        help="timed steps after warm-up (default 10)")
    parser.add_argument("--warmup", type=cli.integer(0), default=None, help="default 3")
    parser.add_argument("--threads", type=cli.integer(0), default=0,
                        help="torch CPU threads (0: default)")
    parser.add_argument("--device", default=None, type=cli.DEVICE)
    parser.add_argument("--num-samples", type=cli.integer(1), default=None,
                        help="images of the timed sampling (default 16)")
    parser.add_argument("--op-report", type=cli.integer(0), default=0, metavar="N",
                        help="also report the N most frequent ops of the counted step")
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend for --compile (default inductor; aot_eager: no codegen)")
    parser.add_argument("--kernels", action="store_true",
                        help="also count the kernels of one step with the profiler (sees compiled code)")
    parser.add_argument("--explain", action="store_true",
                        help="also report torch._dynamo.explain graph / break counts of the forward")
    parser.add_argument("--kernel-profile", type=cli.integer(0), default=0, metavar="N",
                        help="CUDA: also report one step's kernel time by kind and its N "
                             "costliest kernels")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the fake-tensor measurement of the memory at backward start")
    config, args = parse_args(argv, parser)
    check_args(config, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = resident_at_backward(config)
    if args.memory_only:
        print(json.dumps({"preset": config.preset, "batch_size": config.batch_size,
                          "amp": "bf16" if config.amp == "auto" else config.amp,
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
    config = trainer.config  # "auto" resolved for the device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # one step's micro-batches (--grad_accum_steps)
    micro = [[batches[(i + k) % 2] for k in range(config.grad_accum_steps)] for i in range(2)]
    times, graphs = [], []  # graphs: dynamo's count of compiled graphs after each step
    settling = 0  # extra warm-up steps while updates are skipped (see below)
    i = 0
    while i < args.warmup + args.steps:
        if i == args.warmup and device.type == "cuda":  # steady state: warm-up and capture done
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        metrics = trainer.train_step(micro[i % 2])
        sync()
        times.append(time.perf_counter() - t0)
        graphs.append(dynamo_counters["stats"]["unique_graphs"])
        i += 1
        # fp16: the loss scale starts high, so the first updates overflow and are skipped,
        # and until one is taken the step runs uncaptured; time the steady state
        if i == args.warmup and bool(metrics["skipped"]) and settling < MAX_SETTLING_STEPS:
            settling += 1
            i -= 1
            times.pop()
    step_s = statistics.median(times[args.warmup:] or times)
    steady_peak = peak_memory_gib(device) if device.type == "cuda" and args.steps else None
    if steady_peak is not None:  # a captured step's activations live in its graph's pool,
        torch.cuda.empty_cache()  # which stays reserved (and is not "allocated" between replays)
        steady_peak = max(steady_peak, torch.cuda.memory_reserved(device) / 2**30)
    counter = OpCounter()
    with counter:
        trainer.train_step(micro[0])
    kernels = count_kernels(lambda: trainer.train_step(micro[1])) if args.kernels else None
    busy = (gpu_busy_fraction(lambda: trainer.train_step(micro[1]), device)
            if device.type == "cuda" else None)
    profile = None
    if args.kernel_profile and device.type == "cuda":
        step_kernels = kernel_times(lambda: trainer.train_step(micro[1]), device)
        step_fn = trainer.train_step_fn
        captured = getattr(step_fn, "capture", False)
        step_fn.capture = False  # the same step uncaptured: its ops tell what each kernel is
        eager_kernels = kernel_times(lambda: trainer.train_step(micro[0]), device)
        step_fn.capture = captured
        profile = kernel_profile(eager_kernels, step_kernels, args.kernel_profile)
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
              "first_step_s": round(times[0], 2), "settling_steps": settling,
              "grad_accum_steps": config.grad_accum_steps,
              "activation_checkpointing": config.activation_checkpointing,
              "peak_memory_gib": round(peak_memory_gib(device), 3), **memory,
              f"sample_{args.num_samples}_s": round(sample_s, 3),
              "aten_ops_per_step": counter.ops, "host_syncs_per_step": counter.syncs,
              "host_sync_sites": dict(counter.sync_sites)}
    if config.compile != "none":  # every step after the first reuses what it compiled
        report["compiled_graphs"] = graphs[0]
        report["recompiles_after_first_step"] = graphs[-1] - graphs[0]
    if steady_peak is not None:
        report["steady_peak_gib"] = round(steady_peak, 3)
    if busy is not None:
        report["gpu_busy_fraction"] = round(busy, 3)
    if profile is not None:
        report["kernel_profile"] = profile
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
