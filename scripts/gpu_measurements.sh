#!/usr/bin/env bash
# Every GPU measurement issue #13 still needs, in one run.  Order: the
# cheapest and most telling first, so that a cut-off run still reports them.
#
#   bash scripts/gpu_measurements.sh [OUT_DIR]     # on a machine with one CUDA GPU
#
# 1. the real-capture tests (skipped on the CPU);
# 2. eager against captured steps: losses, weights, ms/step (cifar10 and mnist);
# 3. the README table: the four paper presets, bf16, eager and captured steps;
# 4. cifar10 with --compile regional (inductor): the first step's compile time
#    (target: under 60 s), graphs, recompiles, ms/step, with and without capture.
# Each part's output is also written to OUT_DIR (default: gpu-measurements/).
set -u
out="${1:-gpu-measurements}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 240 python -m pytest -q -x tests/test_graphed_step.py -k gpu 2>&1 | tail -25 | tee "$out/tests.txt"
for args in "--preset cifar10 --batch_size 32" "--preset mnist --batch_size 200"; do
    timeout 180 python scripts/check_cuda_graphs.py $args --amp bf16 --steps 8 --warmup 4 \
        2>>"$out/check.err" | tee -a "$out/check.jsonl"
done
timeout 600 python scripts/bench_table.py --amp bf16 --cuda_graphs false,true --timeout 150 \
    --extra "--steps 5 --warmup 4 --num-samples 4" --json "$out/table.json" --overwrite \
    | tee "$out/table.md"
for graphs in false true; do
    timeout 300 python scripts/bench.py --preset cifar10 --batch_size 32 --amp bf16 \
        --compile regional --cuda_graphs $graphs --steps 20 --warmup 5 --num-samples 4 \
        2>>"$out/compile.err" | tee -a "$out/compile.jsonl"
done
