#!/usr/bin/env bash
# Create benchmarks/.venv-peers with the peer tools that P2 and P2b compare against: TRAK's
# `traker` package and dattri. It is kept apart from the project's .venv so that their pins
# cannot change the product's dependencies. torch is installed first, at the CPU build the
# project uses, so that neither package pulls a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet "torch==$torch_version"
# transformers builds the GPT-2 models; the benchmark scripts import the product from the repo root.
"$venv/bin/pip" install --quiet traker dattri transformers scipy psutil
"$venv/bin/pip" install --quiet --no-deps -e "$here/.."
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "traker", "dattri", "transformers"):
    print(f"{name}=={md.version(name)}")
PY
