#!/usr/bin/env bash
# Mutation testing with cosmic-ray: mutate one core module, run the tests that guard it, count the mutants they
# kill (docs/testing.md records the last figures). cosmic-ray rewrites the module in place, so this works on a
# copy of the tree in a temporary folder and the checkout is never touched.
#   .venv/bin/pip install -e '.[mutation]'
#   bash tests/mutation/run.sh TARGET [--keep]      # TARGET: finetune | optim | trainer | checkpoint | all
# Prints cr-report's summary and the surviving mutants (each a diff to read: a missing test, or an equivalent
# mutant). finetune takes minutes, optim about 95; trainer (465 mutants) and checkpoint (430) take hours on 2 cores.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py="$repo/.venv/bin/python"
declare -A MODULE=(
  [finetune]=fsdp_ft/model/trainable.py        # what trains
  [optim]=fsdp_ft/training/optim.py              # decay groups, schedule, kernel choice
  [trainer]=fsdp_ft/training/trainer.py          # loss normalisation, accumulation, clipping, the loop
  [checkpoint]=fsdp_ft/checkpoint/dcp_checkpoint.py    # save, verify, resume, RNG restore
)
declare -A TESTS=(
  [finetune]="tests/test_partial.py"
  [optim]="tests/test_optim.py"
  [trainer]="tests/test_reference_trainer.py"
  [checkpoint]="tests/test_reference_trainer.py::test_resume_restores_rng_and_data_position tests/test_run_dir.py tests/test_resume.py"
)
target=${1:?usage: run.sh finetune|optim|trainer|checkpoint|all [--keep]}
if [[ $target == all ]]; then
  for t in finetune optim trainer checkpoint; do bash "$0" "$t" "${@:2}"; done
  exit
fi
[[ -n ${MODULE[$target]:-} ]] || { echo "run.sh: unknown target '$target' (finetune, optim, trainer, checkpoint, all)" >&2; exit 2; }
"$py" -c "import cosmic_ray" 2>/dev/null || { echo "run.sh: cosmic-ray is missing: .venv/bin/pip install -e '.[mutation]'" >&2; exit 2; }
work=$(mktemp -d /tmp/fsdp_ft-mutation-XXXX)
[[ ${2:-} == --keep ]] || trap 'rm -rf "$work"' EXIT
rsync -a --exclude .venv --exclude .git --exclude runs --exclude data "$repo/" "$work/tree/"
cat > "$work/config.toml" <<TOML
[cosmic-ray]
module-path = "${MODULE[$target]}"
timeout = 900.0
excluded-modules = []
test-command = "$py -m pytest -x -q -p no:cacheprovider -p no:randomly ${TESTS[$target]}"

[cosmic-ray.distributor]
name = "local"
TOML
cd "$work/tree"
"$py" -m cosmic_ray.cli init "$work/config.toml" "$work/session.sqlite"
echo "+ $target: $("$repo/.venv/bin/cr-report" "$work/session.sqlite" | tail -1) against ${TESTS[$target]}"
"$py" -m cosmic_ray.cli baseline "$work/config.toml"
"$py" -m cosmic_ray.cli exec "$work/config.toml" "$work/session.sqlite"
"$repo/.venv/bin/cr-report" --surviving-only --show-diff "$work/session.sqlite"
