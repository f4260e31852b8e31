#!/usr/bin/env bash
# Sourced by demo.sh, test.sh and test_deploy.sh: make the virtual environment (once), install diffdenoise
# into it with the given extras, and activate it. Reinstalls only when setup.cfg changed. VENV names the
# environment's folder (default .venv; test_deploy.sh uses .venv-deploy). TORCH_SPEC picks the torch build
# (the default is the CPU build this project is tested with; on a CUDA machine use e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.installed-$(cat setup.cfg | sha1sum | cut -c1-12)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  # torch pinned again: an extra that depends on torch must not pull another build
  python -m pip install -q -e ".${extras:+[$extras]}" "${TORCH_SPEC:-torch==2.13.0}"
  touch "$stamp"
fi
