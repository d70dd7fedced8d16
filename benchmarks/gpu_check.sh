#!/usr/bin/env bash
# Every GPU check of the Core issue in one prepared run, for a lent GPU machine (H100/H200):
#   1. build the op with its CUDA kernels, print versions and the backend;
#   2. the CUDA op tests (float32 to 1e-5, bf16/fp16 against float32, backward against the CPU);
#   3. bench_op.py on the GPU: compiled fp32/bf16 vs the grid_sample fallback vs transformers;
#   4. bench_model.py at 800x1333: fp32 and bf16, batch 1 and 4 (images/s, vs transformers).
# Needs only what such a machine's image holds (torch, transformers, timm, pytest): the package
# runs from this tree through PYTHONPATH, nothing is installed. Each step's output is kept in
# $OUT (the device tool's folder) or ./gpu-check; the exit status is non-zero if a step failed.
#
#   bash benchmarks/gpu_check.sh          # about 5-8 minutes, most of it the first CUDA build
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DDETR_CACHE="${DDETR_CACHE:-/tmp/ddetr-cache}"
py="${PYTHON:-python3}"
failed=0

step() {  # step NAME CMD...: run, keep the log as $out/NAME.txt, note a failure
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=1
}

step env "$py" -c "
import torch, json
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
try:
    import transformers; print('transformers', transformers.__version__)
except ImportError:
    print('transformers: not installed')
from ddetr_cli.ops.msda import backend_info
info = backend_info(); print(json.dumps(info))
assert info['cuda_kernels'], 'the CUDA kernels did not build'
"
step cuda_tests "$py" -m pytest -q -p no:cacheprovider tests/test_op.py -k cuda
step bench_op "$py" benchmarks/bench_op.py --device cuda --repeats 20
for dtype in fp32 bf16; do
    for batch in 1 4; do
        step "model_${dtype}_b${batch}" "$py" benchmarks/bench_model.py --device cuda --dtype "$dtype" \
            --batch "$batch" --height 800 --width 1333 --repeats 20
    done
done
exit "$failed"
