#!/usr/bin/env bash
# Quick start 2: install into .venv with the test extras and run the test suite on CPU.
# Tests that need ../shared/data skip with a reason when it is absent. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh" test
exec python -m pytest "$@"
