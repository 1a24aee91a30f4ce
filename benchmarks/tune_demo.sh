#!/usr/bin/env bash
# The search demo of docs/tuning.md: configs/tune_imdb.yaml searched with pruning and without, then trial 0 (the
# README demo's settings) and each search's best trial scored on 500 held-out reviews that no trial saw.
# Usage: bash benchmarks/tune_demo.sh [OUT]   (default runs/tune_demo; about 30-40 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-runs/tune_demo}")
py=.venv/bin/python
[ -f data/imdb/eval.jsonl ] || $py -m fsdp_ft.prepare.imdb --out data
head -n 500 data/imdb/eval.jsonl > data/imdb/search_eval.jsonl
tail -n 500 data/imdb/eval.jsonl > data/imdb/test.jsonl
mkdir -p "$out"
for mode in median none; do
  sed -n '/^tune:/,$p' configs/tune_imdb.yaml | sed "s/^  pruner: median/  pruner: $mode/" > "$out/space-$mode.yaml"
  start=$(date +%s)
  .venv/bin/fsdp-ft tune configs/tune_imdb.yaml output_dir="$out/$mode" --nproc-per-node 2 --space "$out/space-$mode.yaml"
  echo "search with pruner $mode: $(( $(date +%s) - start )) s wall"
done
for mode in median none; do
  for model in "$out/$mode/trials/0000" "$out/$mode/best"; do
    echo "== $model on data/imdb/test.jsonl"
    .venv/bin/fsdp-ft eval "$model" --data data/imdb/test.jsonl | grep -E '"(accuracy|f1_macro|loss)"' || true
  done
done
