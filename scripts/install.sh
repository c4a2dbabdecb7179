#!/usr/bin/env bash
# The one install recipe: the pinned runtime, the accelerator pieces and the project, into the Python
# environment whose interpreter is given (a venv's python, or the Docker image's).
#   bash scripts/install.sh --python PY [--cuda none|12|13] [--dev] [--editable] [--no-dali]
# --cuda 12|13: jax's CUDA plugin and NVIDIA DALI for that CUDA major version (the Docker image);
# --cuda none : CPU jax, and DALI's CUDA 12 wheel, whose CPU operators run anywhere (tests, laptops).
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3 cuda=none dev=0 editable=0 dali=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --python) py=$2; shift 2 ;;
    --cuda) cuda=$2; shift 2 ;;
    --dev) dev=1; shift ;;
    --editable) editable=1; shift ;;
    --no-dali) dali=0; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
jax_version=$("$py" - <<'PY'
import re, sys
for line in open("requirements/pinned.txt"):
    m = re.match(r"jax==([\d.]+)\s*;\s*python_version\s*(>=|<)\s*\"([\d.]+)\"", line)
    if m:
        v, op, ref = m.group(1), m.group(2), tuple(map(int, m.group(3).split(".")))
        if (sys.version_info[:2] >= ref) == (op == ">="):
            print(v)
PY
)
reqs=(-r requirements/pinned.txt)
case $cuda in
  none) [[ $dali == 1 && "$(uname -s)" == Linux ]] && reqs+=("nvidia-dali-cuda120==2.4.0") ;;
  12|13) reqs+=("jax-cuda${cuda}-plugin[with-cuda]==${jax_version}")
         [[ $dali == 1 ]] && reqs+=("nvidia-dali-cuda${cuda}0==2.4.0") ;;
  *) echo "install.sh: --cuda must be none, 12 or 13" >&2; exit 2 ;;
esac
[[ $dev == 1 ]] && reqs+=(-r requirements/dev.txt)
"$py" -m pip install "${reqs[@]}"
if [[ $editable == 1 ]]; then
  "$py" -m pip install --no-deps -e .
else
  "$py" -m pip install --no-deps .
fi
"$py" -c "import jax, flax, optax, orbax.checkpoint, nnunet_jax; print('installed: jax', jax.__version__, jax.devices())"
