#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Safe to rerun:
# a finished install is recorded in .venv/.installed-<hash of the inputs>.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=".venv/.installed-$(cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
echo "bootstrap: installing torch (CPU build) and the project; this takes a few minutes once" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/local.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
rm -f .venv/.installed-*
touch "$stamp"
echo "bootstrap: done" >&2
