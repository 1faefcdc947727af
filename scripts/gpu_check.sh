#!/usr/bin/env bash
# Everything a GPU machine should check, in one run of at most 8 minutes on one GPU,
# writing 5 files to OUT_DIR (default: gpu-check/):
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
#   summary.md   the machine, the GPU tests' result, the benchmark table, the kernel profile
#   tests.log    pytest -m gpu (synthetic data: no dataset, no optional package)
#   bench.jsonl  one scripts/bench.py report per row
#   bench.err    the rows' stderr (what each run chose, captures, errors)
#   warm.log     the compile warm-up
#
# Rows: every paper preset at its per-GPU batch in the default mode (no performance
# flag: on a GPU bf16, --compile regional, the captured step), then the eager and
# activation-checkpointing rows of cifar10 and celebahq256 and fp16 against bf16, all
# with ms/step, the steady training peak (reset after warm-up) and the GPU's busy
# fraction, and a kernel-time profile of the default cifar10 step.  The compiles of
# the default rows run first, side by side, while the tests run; inductor's on-disk
# cache then serves the timed rows.  Rows past the time budget are reported as skipped.
set -u
out="${1:-gpu-check}"
mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONUNBUFFERED=1
start=$(date +%s)
budget=${GPU_CHECK_SECONDS:-450}   # the rows stop being started after this many seconds
summary="$out/summary.md"
: > "$out/bench.jsonl"; : > "$out/bench.err"; : > "$out/warm.log"

{
  echo "# hvae GPU check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
  python -c "import torch; print('torch', torch.__version__, '/ CUDA', torch.version.cuda, '/ cuDNN', torch.backends.cudnn.version())"
  echo
} > "$summary"

# 1. the GPU tests, beside the compile warm-up of the default rows
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider "$here/../tests" > "$out/tests.log" 2>&1 &
tests=$!
DEFAULT_ROWS=("mnist 200" "cifar10 32" "celeba64 16" "celebahq256 4")
for row in "${DEFAULT_ROWS[@]}"; do
  set -- $row
  timeout 200 python "$here/bench.py" --preset "$1" --batch_size "$2" --steps 1 --warmup 1 \
      --num-samples 1 >> "$out/warm.log" 2>&1 &
done
wait
echo "warm-up and tests done after $(( $(date +%s) - start )) s" >> "$out/warm.log"

# 2. the timed rows, one process each (a fresh peak counter)
bench_row() {  # bench_row LABEL PRESET BATCH [bench.py flags...]
  local label="$1" name="$2" batch="$3"; shift 3
  if (( $(date +%s) - start > budget )); then
    echo "{\"row\": \"$label\", \"preset\": \"$name\", \"batch_size\": $batch, \"error\": \"skipped: out of time\"}" >> "$out/bench.jsonl"
    return
  fi
  echo "== $label" >> "$out/bench.err"
  local line
  line=$(timeout 150 python "$here/bench.py" --preset "$name" --batch_size "$batch" --steps 6 \
         --warmup 4 --num-samples 4 "$@" 2>> "$out/bench.err" | tail -n 1)
  if [[ "$line" == "{"* ]]; then
    echo "{\"row\": \"$label\", ${line:1}" >> "$out/bench.jsonl"
  else
    echo "{\"row\": \"$label\", \"preset\": \"$name\", \"batch_size\": $batch, \"error\": \"$(tail -n 1 "$out/bench.err" | tr -d '"\\' | cut -c1-150)\"}" >> "$out/bench.jsonl"
  fi
}
bench_row "default" cifar10 32 --kernel-profile 15
bench_row "bf16 captured, no compile" celebahq256 4 --compile none
bench_row "bf16 captured, no compile, checkpointing" celebahq256 4 --compile none --activation_checkpointing true
bench_row "bf16 captured, no compile" cifar10 32 --compile none
bench_row "fp16 captured, no compile" cifar10 32 --compile none --amp fp16
bench_row "default" celebahq256 4
bench_row "default" mnist 200
bench_row "default" celeba64 16
bench_row "bf16 eager" cifar10 32 --compile none --cuda_graphs false
bench_row "bf16 eager" celebahq256 4 --compile none --cuda_graphs false
bench_row "default, checkpointing" cifar10 32 --activation_checkpointing true

# 3. the summary: tests, table, profile
python - "$out" >> "$summary" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
log = (out / "tests.log").read_text().strip().splitlines()
print("## GPU tests (`pytest -m gpu`)\n\n" + (log[-1] if log else "no output") + "\n")
failed = [l for l in log if l.startswith(("FAILED", "ERROR"))]
for l in failed[:10]:
    print("- " + l[:200])
rows = [json.loads(l) for l in (out / "bench.jsonl").read_text().splitlines() if l.strip()]
cols = [("ms_per_step", "ms/step"), ("steady_peak_gib", "steady peak GiB"),
        ("peak_memory_gib", "run peak GiB"), ("gpu_busy_fraction", "GPU busy"),
        ("first_step_s", "first step s"), ("graph_captures", "captures"),
        ("settling_steps", "settling steps")]
print("\n## Training step, median of 6 after warm-up\n")
print("| preset (batch) | row | amp | compile | CUDA graphs | " + " | ".join(t for _, t in cols) + " |")
print("|" + "---|" * (5 + len(cols)))
for r in rows:
    head = [f"{r.get('preset')} ({r.get('batch_size')})", r.get("row", ""), str(r.get("amp", "")),
            str(r.get("compile", "")), str(r.get("cuda_graphs", ""))]
    if "error" in r:
        print("| " + " | ".join(head + [f"error: {r['error']}"] + [""] * (len(cols) - 1)) + " |")
        continue
    cells = ["–" if r.get(k) is None else (f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]))
             for k, _ in cols]
    print("| " + " | ".join(head + cells) + " |")
for r in rows:
    prof = r.get("kernel_profile")
    if not prof:
        continue
    print(f"\n## Kernel time of one {r['preset']} b{r['batch_size']} step ({r.get('row')}): "
          f"{prof['kernel_ms']} ms in {prof['kernels']} distinct kernels\n")
    print("| kind | ms | share |\n|---|---|---|")
    for kind, ms in prof["by_kind_ms"].items():
        print(f"| {kind} | {ms:.2f} | {ms / prof['kernel_ms']:.1%} |")
    print("\n| top kernels | ms |\n|---|---|")
    for name, ms in prof["top_kernels_ms"]:
        print(f"| `{re.sub(r'[|`]', ' ', name)[:100]}` | {ms:.2f} |")
PY
echo "" >> "$summary"
echo "total $(( $(date +%s) - start )) s" >> "$summary"
cat "$summary"
