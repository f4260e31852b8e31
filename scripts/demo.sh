#!/usr/bin/env bash
# Quick start 1: install into .venv and run the demo on data shipped with an installed package (offline).
# Extra arguments go to `diffdenoise demo`, e.g. `bash scripts/demo.sh --preset smoke --out /tmp/demo`.
source "$(dirname "$0")/env.sh" ""
exec diffdenoise demo "$@"
