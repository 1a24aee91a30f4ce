#!/usr/bin/env bash
# Download, into ./.whl, the packages fsdp_ft needs that the lent GPU machines' image lacks (it has torch 2.11,
# transformers 5.17, peft, accelerate, safetensors, pyarrow, xxhash, pytest-xdist; it cannot reach PyPI), then
# check that they and the working tree fit the 64 MiB a device call may carry. Then: benchmarks/gpu_check.sh.
#   torchao 0.18.0        3.4 MB   the NF4 base (pure Python where fsdp_ft uses it; its C++ extras may not load)
#   datasets 5.2.0 (+ dill 0.4.1, multiprocess 0.70.19)  0.9 MB   data loading
#   bitsandbytes 0.50.2  43.1 MB   only the CUDA reference of test_gpu's NF4 check (it skips without it)
# Together 47.4 MB = 45.2 MiB; with the ~2 MiB tree, 47 MiB of the 64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "torchao==0.18.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "bitsandbytes==0.50.2"
# what a device call carries: tracked and untracked-not-ignored files, plus .whl
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | while read -r f; do
  [ -f "$f" ] && stat -c %s "$f"; done | awk '{s += $1} END {print s + 0}')
wheels=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
total=$(( tree + wheels ))
awk -v w="$wheels" -v t="$tree" 'BEGIN { m = 1048576
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n",
    w/m, t/m, (w+t)/m }'

if (( total >= 64 * 1048576 )); then
  echo "too large to carry: drop bitsandbytes (only test_gpu's reference check needs it) or other wheels" >&2
  exit 1
fi
