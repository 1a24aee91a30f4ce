#!/usr/bin/env bash
# Everything fsdp_ft checks on a GPU, as one short run for a lent machine (about 6-8 minutes on an H100):
#   here:           bash benchmarks/gpu_wheels.sh
#   device tool:    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# 1. the GPU targets of docs/benchmarks.md (benchmarks/gpu_targets.py: 1B full fine-tuning MFU, eager and
#    compiled; 8B-shaped QLoRA at seq 2048 beside torchtune's figure), 2. the GPU tests (pytest -m gpu).
# What it learns lands in $OUT (the device tool's folder; else runs/gpu-check): env.txt, gpu_targets.{log,json},
# gpu_tests.log. Each part has its own time limit, so a hang in one still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee "$out/env.txt"; exit 1; }
  export PYTHONPATH="$PWD:/tmp/site"
fi
{ nvidia-smi -L; python3 -c "import torch, transformers, peft, torchao, datasets
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'torchao', torchao.__version__)"; } \
  > "$out/env.txt" 2>&1
cat "$out/env.txt"
timeout 330 python3 benchmarks/gpu_targets.py --out /tmp/gpu-targets --steps 10 --warmup-steps 3 --timeout 150 \
  --targets "${GPU_TARGETS:-full-1b,full-1b-compiled,qlora-8b}" ${GPU_TARGETS_ARGS:-} 2>&1 | tee "$out/gpu_targets.log"
cp /tmp/gpu-targets/gpu_targets.json "$out/" 2>/dev/null
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_debug.py 2>&1 \
  | tee "$out/gpu_tests.log"
