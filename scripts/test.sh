#!/usr/bin/env bash
# The whole test suite from nothing: environments, lint, unit tests (Python >= 3.12 when present) and the
# oracle parity tests (PyTorch/MONAI/scikit on Python 3.11), so both supported Pythons are exercised.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --oracle || exit 1

status=0
echo "== ruff"
.venv/bin/ruff check . || status=1
echo "== unit tests ($(.venv/bin/python -V))"
.venv/bin/python -m pytest tests --ignore=tests/parity -q "$@" || status=1
echo "== parity tests vs PyTorch/MONAI/scikit ($(.venv-oracle/bin/python -V))"
.venv-oracle/bin/python -m pytest tests/parity -q "$@" || status=1
exit $status
