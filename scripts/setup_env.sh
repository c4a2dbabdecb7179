#!/usr/bin/env bash
# Creates the project's virtual environments from nothing (idempotent: re-runs only when pyproject changes).
#   .venv         Python >= 3.12 when the machine has one (jax >= 0.11, oneDNN CPU convolutions), else 3.11,
#                 with the project (editable) and its dev tools.
#   .venv-oracle  (with --oracle) Python 3.11 with PyTorch CPU + MONAI + nnunetv2 + scikit: the reference
#                 implementations tests/parity compares against. PyTorch's CPU build is taken from
#                 torch==2.13.0 where the machine carries it.
# Override the interpreters with NNUNET_PYTHON / NNUNET_ORACLE_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

want_oracle=0
[[ "${1:-}" == "--oracle" ]] && want_oracle=1

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

pick_python() {  # $1 = minimum minor version, $2.. = candidates in order of preference
  local min=$1; shift
  for c in "$@"; do
    [[ -z "$c" ]] && continue
    local p; p=$(command -v "$c" 2>/dev/null || true)
    [[ -z "$p" && -x "$c" ]] && p=$c
    [[ -z "$p" ]] && continue
    local v; v=$(version_of "$p") || continue
    [[ -z "$v" ]] && continue
    if [[ ${v%%.*} -eq 3 && ${v#*.} -ge $min ]]; then echo "$p"; return 0; fi
  done
  return 1
}

pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
main_py=$(pick_python 11 "${NNUNET_PYTHON:-}" python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12 \
  python3.13 "$pyenv_root"/versions/3.13*/bin/python3.13 python3.11 "$pyenv_root"/versions/3.11*/bin/python3.11 \
  python3) || { echo "setup: no Python >= 3.11 found" >&2; exit 1; }

stamp() { cat pyproject.toml requirements/*.txt scripts/setup_env.sh scripts/install.sh | sha1sum | cut -c1-16; }

make_venv() {  # $1 = dir, $2 = python, $3.. = the install command, run with $VENV_PY set to the venv's python
  local dir=$1 py=$2; shift 2
  local want; want="$(stamp) $(version_of "$py")"
  if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$want" ]]; then return 0; fi
  echo "setup: creating $dir with $py (Python $(version_of "$py"))"
  rm -rf "$dir"
  "$py" -m venv "$dir"
  local log="$dir/setup.log"
  if ! { "$dir/bin/python" -m pip install --upgrade pip && VENV_PY="$dir/bin/python" "$@"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2; echo "setup: installing into $dir failed (full log: $log)" >&2; exit 1
  fi
  echo "$want" > "$dir/.stamp"
}

# The same recipe as the Docker image (scripts/install.sh), CPU flavour, plus the test tools.
install_main() { bash scripts/install.sh --python "$VENV_PY" --cuda none --dev --editable; }
make_venv .venv "$main_py" install_main

if [[ $want_oracle == 1 ]]; then
  oracle_py=$(pick_python 11 "${NNUNET_ORACLE_PYTHON:-}" python3.11 "$pyenv_root"/versions/3.11*/bin/python3.11 \
    "$main_py") || { echo "setup: no Python for the oracle venv" >&2; exit 1; }
  # torch 2.13.0: on these machines pip finds its CPU build on disk (no CUDA libraries to download).
  # nnunetv2 2.8.1 is the oracle for the nnU-Net v2 interop; torch is pinned in the same command so its
  # requirements cannot move it. torchvision (pulled in through timm, used only by the Primus/EVA networks)
  # exists on the registry only as a CUDA build that fails to import next to CPU torch, so it is removed.
  install_oracle() {
    bash scripts/install.sh --python "$VENV_PY" --cuda none --dev --editable --no-dali &&
      "$VENV_PY" -m pip install "torch==2.13.0" "monai==1.6.1" "nnunetv2==2.8.1" &&
      "$VENV_PY" -m pip uninstall -y torchvision
  }
  make_venv .venv-oracle "$oracle_py" install_oracle
fi
