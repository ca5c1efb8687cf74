#!/usr/bin/env bash
# Set up .venv if needed, then run the whole AutoMixer job on local Ray with the bundled real data:
# train a small proxy on the corpus, pick a checkpoint per benchmark, score a seeded subsample of
# the corpus and write the weighted group manifest and report under runs/demo.
# Extra arguments go to `automixer run`; --all scores the whole corpus instead of 2000 samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
DATA=${AUTOMIXER_DATA:-../shared/data}
if [ ! -d "$DATA/corpus" ] || [ ! -d "$DATA/tasks" ]; then
    echo "demo: $DATA/corpus and $DATA/tasks not found; set AUTOMIXER_DATA to a folder with that layout" >&2
    exit 2
fi
DATA=$(cd "$DATA" && pwd)
max_samples=(--max-samples 2000)
args=()
for arg in "$@"; do
    if [ "$arg" = "--all" ]; then max_samples=(); else args+=("$arg"); fi
done
exec .venv/bin/automixer run --corpus "$DATA/corpus" --tasks "$DATA/tasks" --output runs/demo \
    "${max_samples[@]}" "${args[@]}"
