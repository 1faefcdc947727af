"""Run scripts/bench.py for every paper preset (or chosen ones) and print a Markdown table.

    python tools/bench_table.py                                  # paper presets, their batch/GPU
    python tools/bench_table.py --presets mnist,cifar10 --amp none,bf16 --compile none,regional
    python tools/bench_table.py --presets cifar10 --cuda_graphs false,true   # on a GPU
    python tools/bench_table.py --presets demo --batch 64 --extra "--threads 2"

Each configuration runs in its own process (a fresh peak-memory counter, no
compiled code shared between rows); a row that fails (out of memory, say) gets
its last error line instead of numbers, and the table goes on.  ``--json FILE``
also keeps every row's full report.  This is the script to run when a GPU is
at hand: one command, one table for README.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae import cli  # noqa: E402
from hvae.config import AMP_MODES, COMPILE_MODES, PRESETS, preset  # noqa: E402

PAPER_PRESETS = ("mnist", "cifar10", "celeba64", "celebahq256")
BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
COLUMNS = [  # (report key, column title); missing keys print as "–"
    ("ms_per_step", "ms/step"), ("images_per_s", "images/s"), ("peak_memory_gib", "peak GiB"),
    ("steady_peak_gib", "steady peak GiB"),
    ("resident_at_backward_gib", "GiB at backward (fake)"),
    ("gpu_busy_fraction", "GPU busy"), ("first_step_s", "first step s"),
    ("aten_ops_per_step", "aten ops/step"), ("host_syncs_per_step", "host syncs/step")]


def names(text: str, allowed, what: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise cli.UsageError(f"--{what}: unknown {', '.join(unknown) or '(empty)'}; "
                             f"known: {', '.join(allowed)}")
    return chosen


def run_row(preset_name: str, batch: int, amp: str, compile_mode: str, extra: list[str],
            timeout: float, cuda_graphs: str = "false") -> dict:
    cmd = [sys.executable, str(BENCH), "--preset", preset_name, "--batch_size", str(batch),
           "--amp", amp, "--compile", compile_mode, "--cuda_graphs", cuda_graphs, *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:120]}
    return json.loads(lines[-1])


def cell(report: dict, key: str) -> str:
    value = report.get(key)
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


@cli.entry_point("bench_table.py")
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="bench_table.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PAPER_PRESETS))
    parser.add_argument("--batch", type=cli.integer(1), default=None,
                        help="per-device batch of every row (default: each preset's own)")
    parser.add_argument("--amp", default="bf16", help="comma-separated: none,fp16,bf16")
    parser.add_argument("--compile", default="none", help="comma-separated: none,regional,full")
    parser.add_argument("--cuda_graphs", default="false", help="comma-separated: false,true")
    parser.add_argument("--extra", default="", help="more bench.py arguments, one string")
    parser.add_argument("--timeout", type=cli.finite_float(0, above=True), default=1800,
                        help="seconds per row")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every report")
    parser.add_argument("--overwrite", action="store_true", help="replace --json FILE if it exists")
    args = parser.parse_args(argv)
    if args.json:  # refused now rather than after an hour of benchmarks
        cli.check_new_file(args.json, "--json", args.overwrite)
    elif args.overwrite:
        raise cli.UsageError("--overwrite does nothing without --json FILE")
    presets = names(args.presets, sorted(PRESETS), "presets")
    amps = names(args.amp, AMP_MODES, "amp")
    modes = names(args.compile, COMPILE_MODES, "compile")
    graphs = names(args.cuda_graphs, ("false", "true"), "cuda_graphs")
    extra = shlex.split(args.extra)
    header = ["preset", "batch", "amp", "compile", "CUDA graphs"] + [title for _, title in COLUMNS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    reports = []
    for name, amp, mode, graphed in itertools.product(presets, amps, modes, graphs):
        batch = args.batch or preset(name).batch_size
        report = run_row(name, batch, amp, mode, extra, args.timeout, graphed)
        reports.append({"preset": name, "batch": batch, "amp": amp, "compile": mode,
                        "cuda_graphs": graphed, **report})
        values = ([f"error: {report['error']}"] + [""] * (len(COLUMNS) - 1) if "error" in report
                  else [cell(report, key) for key, _ in COLUMNS])
        print("| " + " | ".join([name, str(batch), amp, mode, graphed] + values) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
