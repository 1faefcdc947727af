"""Benchmark one training step and sampling: ms/step, images/s, peak memory.

    python scripts/bench.py --preset mnist --batch_size 32
    python scripts/bench.py --preset demo --batch_size 64 --threads 2

The step is the real one of training (forward, full loss with the spectral and
BatchNorm regularisers, backward, Adamax update) on synthetic data of the
preset's shape, so no dataset is needed.  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae import cli  # noqa: E402
from hvae.config import parse_args  # noqa: E402
from hvae.training import Runtime, Trainer  # noqa: E402


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
    trainer = Trainer(config, Runtime(device=device), progress=False,
                      run_dir="/tmp/hvae-bench", loaders=(batches, batches))
    trainer.total_steps = 10**9  # keep the schedules in their mid-training regime

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
                      f"sample_{args.num_samples}_s": round(sample_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
