"""Benchmark one training step and sampling: ms/step, images/s, peak memory.

    python scripts/bench.py --preset mnist --batch_size 32
    python scripts/bench.py --preset demo --batch_size 64 --threads 2

The step is the real one of training (forward, full loss with the spectral and
BatchNorm regularisers, backward, Adamax update) on synthetic data of the
preset's shape, so no dataset is needed.  Prints one JSON line, with two
device-independent counts of one (non-logging) step: aten compute ops
dispatched, and host syncs (``aten._local_scalar_dense``: ``.item()``,
``float(t)``, ``bool(t)``) outside ``torch.optim``.
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
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae import cli  # noqa: E402
from hvae.config import parse_args  # noqa: E402
from hvae.runtime import Runtime  # noqa: E402
from hvae.training import Trainer  # noqa: E402

# Ops that move no data through a kernel (views, metadata): not counted as compute.
_NOT_COMPUTE = ("view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t",
                "as_strided", "detach", "alias", "unsqueeze", "squeeze", "slice", "select",
                "split", "chunk", "unbind", "split_with_sizes", "empty", "empty_like",
                "empty_strided", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
                "sym_storage_offset")


class OpCounter(TorchDispatchMode):
    """Counts aten compute ops and host syncs dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.sync_sites = 0, 0, Counter()

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
        return func(*args, **(kwargs or {}))


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
    config, args = parse_args(argv, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = synthetic_batches(config, 2, device)
    # a very long run keeps the schedules in their warm-up regime (KL balancing on)
    trainer = Trainer(config.replace(epochs=10**9, max_steps=0), Runtime(device=device),
                      progress=False, run_dir="/tmp/hvae-bench", loaders=(batches, batches))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(batches[i % 2])
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    counter = OpCounter()
    with counter:
        trainer.train_step(batches[0])
    model = trainer.eval_model.eval()
    with torch.no_grad():
        model.sample(args.num_samples)
        sync()
        t0 = time.perf_counter()
        model.sample(args.num_samples)
        sync()
        sample_s = time.perf_counter() - t0
    params = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps({"preset": config.preset, "batch_size": config.batch_size,
                      "device": str(device), "threads": torch.get_num_threads(),
                      "amp": config.amp, "params": params,
                      "ms_per_step": round(step_s * 1000, 1),
                      "images_per_s": round(config.batch_size / step_s, 2),
                      "peak_memory_gib": round(peak_memory_gib(device), 3),
                      f"sample_{args.num_samples}_s": round(sample_s, 3),
                      "aten_ops_per_step": counter.ops, "host_syncs_per_step": counter.syncs,
                      "host_sync_sites": dict(counter.sync_sites)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
