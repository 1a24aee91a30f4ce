#!/usr/bin/env bash
# Download, into ./.whl, the packages fsdp_ft needs that the lent GPU machines' image lacks (it has torch,
# transformers, peft, accelerate, safetensors, pyarrow, xxhash; it cannot reach PyPI). About 47 MB: with the
# working tree it stays under the 64 MiB a device call may carry. Then: benchmarks/gpu_check.sh, carrying .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
# torchao: the NF4 base; datasets (+ dill, multiprocess): data loading; bitsandbytes: the CUDA reference in tests
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "torchao==0.18.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "bitsandbytes==0.50.2"
du -sh .whl
