#!/usr/bin/env bash
# Test this checkout on the oldest torch that setup.py allows (or on another version).
#
#   bash tools/check_torch_floor.sh                  # setup.py's floor, e.g. torch 2.10.0
#   bash tools/check_torch_floor.sh 2.11.0           # another torch (torchvision to match)
#   TESTS=tests bash tools/check_torch_floor.sh      # the whole suite instead of the fast part
#
# Makes a venv /tmp/hvae-torch-VERSION (kept, and reused by the next call), installs
# torch==VERSION and its torchvision from PyPI there, then hvae with its test extra
# (not editable; torch held at VERSION), and runs the tests against this checkout.
# The last line says which torch was tested and how the tests went; the exit code is
# pytest's.  PyPI's Linux wheels bring CUDA libraries: 5 to 8 GB per venv.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

floor=$(sed -n 's/.*"torch>=\([0-9][0-9.]*\),.*/\1/p' setup.py)
version=${1:-$floor}
[[ $version =~ ^2\.[0-9]+$ ]] && version=$version.0      # "2.10" -> "2.10.0"
if [[ ! $version =~ ^2\.([0-9]+)\.([0-9]+)$ ]]; then
    echo "check_torch_floor.sh: error: torch version '$version' is not 2.MINOR[.PATCH]" >&2
    exit 2
fi
vision=0.$((BASH_REMATCH[1] + 15)).${BASH_REMATCH[2]}      # torch 2.X.Y <-> torchvision 0.(X+15).Y
venv=/tmp/hvae-torch-$version
# The tests that touch what changes between torch releases (gradient norms, checkpoints,
# autocast, DDP and --sync_bn's differentiable all-reduce, the captured step's CPU twin on
# fake CUDA tensors, NVAE imports) and the entry points; not compile, memory, ablations.
tests=${TESTS:-tests/test_config.py tests/test_data.py tests/test_distributions.py
    tests/test_model.py tests/test_objectives.py tests/test_training.py tests/test_sync_bn.py
    tests/test_graphed_step.py tests/test_nvae_import.py tests/test_bad_input.py}

[[ -x $venv/bin/python ]] || "${PYTHON:-python3}" -m venv "$venv"
constraints=$venv/constraints.txt
printf 'torch==%s\ntorchvision==%s\n' "$version" "$vision" >"$constraints"
export PIP_CONSTRAINT=$constraints  # torch stays at VERSION while hvae's requirements install
"$venv/bin/pip" install -q "torch==$version" "torchvision==$vision"
new=()  # what the non-editable build will leave in the checkout
for d in build hvae.egg-info; do [[ -e $repo/$d ]] || new+=("$repo/$d"); done
"$venv/bin/pip" install -q "$repo[test]"
(( ${#new[@]} == 0 )) || rm -rf "${new[@]}"

log=$venv/pytest.log
set +e  # the tests import this checkout's hvae (PYTHONPATH), not the installed copy
PYTHONPATH=$repo "$venv/bin/python" -m pytest -q -p no:cacheprovider $tests 2>&1 \
    | tee "$log" | tail -n 25
status=${PIPESTATUS[0]}
set -e
torch_seen=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
echo "check_torch_floor: torch $torch_seen, torchvision $vision: $(tail -n 1 "$log" | tr -d '=')" \
     "(exit $status; log $log)"
exit "$status"
