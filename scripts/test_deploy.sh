#!/usr/bin/env bash
# The MONAI Deploy app's tests (tests/deploy) in their own environment, .venv-deploy, with the test and deploy
# extras. Not in .venv: the SDK installs Holoscan as `monai.deploy`, and MONAI's __init__ then loads it (and
# cupy) on every `import monai`, with a stack-size warning, and it downgrades protobuf (docs/deploy.md,
# pitfalls); the training environment stays without it. The tests fail instead of skipping when the SDK
# cannot be imported here. Extra arguments go to pytest.
VENV=.venv-deploy source "$(dirname "$0")/env.sh" test,deploy
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DIFFDENOISE_REQUIRE_DEPLOY=1
exec python -m pytest tests/deploy "$@"
