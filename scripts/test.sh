#!/usr/bin/env bash
# Quick start 2: install into .venv with the test extras and run the test suite on CPU.
# Tests that need ../shared/data skip with a reason when it is absent. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh" test
# One OpenMP thread per process: the tests start several training processes side by side, and on a small
# CPU their threads would oversubscribe the cores (measured: 2-4x slower with 2 threads on a busy 2-core box).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest "$@"
