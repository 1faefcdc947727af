"""Check the CUDA-graph step against the eager step on this machine, and time both.

    python tools/check_cuda_graphs.py --preset cifar10 --batch_size 32 --amp bf16 --steps 20
    python tools/check_cuda_graphs.py --preset demo --steps 6        # CPU: uncaptured twin

Two trainers start from the same weights, on synthetic data of the preset's
shape.  One takes ``TrainStep``'s eager steps.  The other takes
``SyncFreeStep``'s steps: captured and replayed on CUDA, the same step
uncaptured elsewhere.  Both see the same batches and the same seeds, and the
script prints one JSON line with:

- the largest relative difference of the loss over the steps;
- the largest weight difference at the end;
- the skipped steps of each;
- the median ms per step of each, after ``--warmup`` steps;
- on CUDA, the peak memory each one's steps allocated above what was resident
  (the graphed step's gradient buffer, the size of the weights, is resident before);
- the number of captures.

``ok`` is false, and the exit status 1, when the losses differ by more than
``--tolerance``.  The learning rate is capped at 2e-3 (the output says which
was used): at a preset's own rate, on synthetic data, last-bit differences grow
chaotically.  On the CPU, moving one weight of the demo by one ulp changes its
loss by 1% within 6 steps.  This is the first thing to run when a GPU is at hand: the
CPU tests cannot run a real capture.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae import cli  # noqa: E402
from hvae.config import RUN_ONLY, check_flags_matter, explicit_overrides, parse_args, preset  # noqa: E402
from hvae.runtime import Runtime  # noqa: E402
from hvae.training import Trainer, build_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import synthetic_batches  # noqa: E402


def timed_steps(trainer: Trainer, batches: list, seeds: list[int], device: torch.device
                ) -> tuple[list[float], list[float], int, float | None]:
    """Losses, seconds per step, skipped steps, and on CUDA the peak memory (GiB) the
    steps allocated above what was resident before them, of one trainer."""
    losses, seconds, skipped = [], [], 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        metrics = trainer.train_step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))  # outside the timed span
        skipped += bool(metrics["skipped"])
    peak = None
    if device.type == "cuda":
        peak = round((torch.cuda.max_memory_allocated(device) - resident) / 2**30, 3)
    return losses, seconds, skipped, peak


@cli.entry_point("check_cuda_graphs.py")
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="check_cuda_graphs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=cli.integer(1), default=20)
    parser.add_argument("--warmup", type=cli.integer(0), default=5,
                        help="steps left out of the timing (the capture happens in them)")
    parser.add_argument("--tolerance", type=cli.finite_float(0, above=True), default=1e-3,
                        help="largest relative loss difference that passes")
    parser.add_argument("--device", default=None, type=cli.DEVICE)
    config, args = parse_args(argv, parser)
    unused = {name: "check_cuda_graphs.py compares steps on synthetic data" for name in RUN_ONLY}
    unused["cuda_graphs"] = "check_cuda_graphs.py runs both the eager and the captured step"
    check_flags_matter(config, explicit_overrides(args), preset(config.preset), unused)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = synthetic_batches(config, 2, device)
    # schedules stay in their warm-up regime; a rate at which rounding does not grow chaotically
    config = config.replace(epochs=10**9, max_steps=0,
                            learning_rate=min(config.learning_rate, 2e-3),
                            learning_rate_min=min(config.learning_rate_min, 2e-3))
    made = [Trainer(config, Runtime(device=device), progress=False, run_dir=f"/tmp/hvae-check-{k}",
                    loaders=(batches, batches)) for k in ("eager", "graphed")]
    eager, graphed = made
    graphed.model.load_state_dict(eager.model.state_dict())
    if graphed.ema is not None:
        graphed.ema.model.load_state_dict(eager.ema.model.state_dict())
    graphed.train_step_fn = build_step(graphed.config, graphed.runtime, graphed.model,
                                       graphed.schedule, sync_free=True)
    graphed.parts = graphed.train_step_fn.parts
    seeds = [1000 + i for i in range(args.warmup + args.steps)]
    loss_a, time_a, skip_a, peak_a = timed_steps(eager, batches, seeds, device)
    loss_b, time_b, skip_b, peak_b = timed_steps(graphed, batches, seeds, device)
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(loss_a, loss_b))
    weights = max((p - q).abs().max().item()
                  for p, q in zip(eager.model.parameters(), graphed.model.parameters()))
    ms = lambda seconds: round(1000 * statistics.median(seconds[args.warmup:]), 1)  # noqa: E731
    ok = rel <= args.tolerance
    print(json.dumps({
        "preset": config.preset, "batch_size": config.batch_size, "amp": config.amp,
        "compile": config.compile, "device": str(device), "steps": len(seeds),
        "learning_rate": config.learning_rate,
        "captured": graphed.train_step_fn.capture, "captures": graphed.train_step_fn.captures,
        "max_loss_rel_diff": rel, "max_weight_abs_diff": weights,
        "skipped_eager": skip_a, "skipped_graphed": skip_b,
        "eager_ms_per_step": ms(time_a), "graphed_ms_per_step": ms(time_b),
        "eager_step_peak_gib": peak_a, "graphed_step_peak_gib": peak_b,
        "speedup": round(ms(time_a) / max(ms(time_b), 1e-9), 2), "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
