#!/usr/bin/env bash
# Everything fsdp_ft checks on a GPU, as one run for a lent machine: at most GPU_CHECK_BUDGET_S (default 340 s,
# under 6 minutes) on one H100, the install of the carried wheels included.
#   here:          bash benchmarks/gpu_wheels.sh           (the packages the GPU image lacks, into .whl/)
#   device tool:   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
#   CI (CPU):      bash benchmarks/gpu_check.sh --smoke     (the same script on tiny shapes; GPU tests skip)
# Parts, in this order, each under its own time limit, cut to what is left of the budget (a part left with less
# than it needs to say anything is skipped, and says so); each writes its results to $OUT (else runs/gpu-check)
# as soon as it ends:
#   wheels       the carried .whl/ pip-installed into a temporary folder (not with --smoke)
#   env          env.txt: GPU, driver, torch / transformers / peft / torchao / bitsandbytes versions
#   gpu-tests    gpu_tests.log, gpu_tests.xml: every test marked `gpu`, pytest -n 4 (they start a training
#                process each and mostly wait on it: 4 at a time share the 16 cores and the card)
#   qlora-7b     gpu_targets.json, gpu_targets.log: configs/qlora_7b_colab.yaml on 2- and 4-block stacks of
#                Llama-2-7B's shape at seq 2048, peak memory extrapolated to 32 blocks, beside fsdp-ft plan
#   full-1b      the same files: Llama-3.2-1B-shaped full fine-tuning in bf16, MFU
#   full-1b-compiled  the same with compiled blocks (--no-compile drops it; so does a short budget)
# summary.md says how each part ended and what this check does not verify; the exit status is 1 when a part
# failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0 compile=1
for arg in "$@"; do
  case $arg in
    --smoke) smoke=1 ;;
    --no-compile) compile=0 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--smoke] [--no-compile]" >&2; exit 2 ;;
  esac
done
out=${OUT:-runs/gpu-check}
mkdir -p "$out" && out=$(cd "$out" && pwd)
budget=${GPU_CHECK_BUDGET_S:-$( (( smoke )) && echo 1800 || echo 340)}  # +kill grace < 6 min; smoke: CPU
py=${PYTHON:-python3}
work=${GPU_CHECK_WORK:-}  # models, configs, runs: a temporary folder unless given (then kept)
[ -n "$work" ] && mkdir -p "$work" || work=$(mktemp -d /tmp/gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS failed=0
smoke_args=() workers=4
if (( smoke )); then smoke_args=(--smoke); workers=0; fi

left() { echo $(( budget - (SECONDS - start) )); }

exec 3>&1  # progress lines reach the console while each part's output goes to its log

# part NAME CAP MIN COMMAND...: run under min(CAP, time left), or skip when that is under MIN; record the end
part() {
  local name=$1 cap=$2 min=$3 t0=$SECONDS rc status limit
  shift 3
  (( smoke )) && cap=$(( cap * 5 ))  # tiny shapes, but on a (shared) CPU
  limit=$(left)
  (( limit > cap )) && limit=$cap
  if (( limit < min )); then
    echo "| $name | skipped: ${limit} s left of the ${budget} s budget, needs ${min} s | 0 |" >> "$out/summary.md"
    echo "[gpu_check] $name: skipped (${limit} s left)" >&3
    return 0
  fi
  echo "[gpu_check] $name: up to ${limit} s" >&3
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  echo "| $name | $status | $(( SECONDS - t0 )) |" >> "$out/summary.md"
  echo "[gpu_check] $name: $status in $(( SECONDS - t0 )) s" >&3
}

cat > "$out/summary.md" <<EOF
# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)$( (( smoke )) && echo ' (smoke: tiny shapes, CPU allowed)')

Not verified by this check (one GPU): anything across 2+ ranks on NCCL (FSDP all-gather / reduce-scatter over
NCCL, HSDP, multi-rank NF4 shards on CUDA, DCP save/load through NCCL barriers, QLoRA + cpu_offload on 2+ GPUs,
per-rank decisions agreeing), multi-node gloo/NCCL interfaces, SLURM CPU binding; the 32-block QLoRA peak is
extrapolated from 2- and 4-block stacks, not measured; the Colab recipe's own cards (T4 / V100, fp16) are not
the H100; only this machine's torch / transformers versions (env.txt).

| part | how it ended | seconds |
|---|---|---|
EOF

# wheels, env: the carried wheels (torchao, datasets, bitsandbytes: the image lacks them), then what this machine runs
if (( ! smoke )) && ls .whl/*.whl >/dev/null 2>&1; then  # (a CPU smoke run keeps its own environment)
  export PYTHONPATH="$PYTHONPATH:$work/site"
  part wheels 60 10 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
    .whl/*.whl > "$out/env.txt" 2>&1
fi
part env 60 10 "$py" benchmarks/gpu_targets.py --env >> "$out/env.txt" 2>&1
cat "$out/env.txt"

# gpu-tests: every test marked gpu, wherever it lives
mapfile -t gpu_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
"$py" -c "import xdist" 2>/dev/null || workers=0
part gpu-tests 150 40 "$py" -m pytest -q -m gpu -n "$workers" -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$out/gpu_tests.xml" "${gpu_files[@]}" > "$out/gpu_tests.log" 2>&1
tail -n 15 "$out/gpu_tests.log"

targets() {  # targets NAME CAP MIN: one target of gpu_targets.py, its results merged into gpu_targets.json
  part "$1" "$2" "$3" "$py" benchmarks/gpu_targets.py --targets "$1" --out "$work/targets" \
    --json "$out/gpu_targets.json" "${smoke_args[@]}" >> "$out/gpu_targets.log" 2>&1
}
targets qlora-7b 110 45
targets full-1b 70 35
if (( compile )); then
  targets full-1b-compiled 100 60
else
  echo "| full-1b-compiled | skipped: --no-compile | 0 |" >> "$out/summary.md"
fi
grep '^\[gpu_targets\] .*: {' "$out/gpu_targets.log" 2>/dev/null | cut -c1-400

{ echo; echo "total $(( SECONDS - start )) s of the ${budget} s budget"; } >> "$out/summary.md"
"$py" benchmarks/gpu_targets.py --summary "$out" >> "$out/summary.md" 2>&1
cat "$out/summary.md"
[ -n "${GPU_CHECK_WORK:-}" ] || rm -rf "$work"
exit $failed
