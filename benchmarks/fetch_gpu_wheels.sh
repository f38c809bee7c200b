#!/usr/bin/env bash
# Download, into the git-ignored .whl/, the wheels that the GPU image lacks (docs/benchmarks.md): litdata and
# jsonargparse with what they need, and the optional liger-kernel and torchao (float8), for Python 3.12 on x86_64 Linux.
# Run it where the package index is reachable; the device tool then carries .whl/ with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY_VERSION:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .whl \
  litdata jsonargparse docstring-parser typeshed-client boto3 botocore s3transfer jmespath obstore \
  lightning-utilities liger-kernel torchao
ls -1 .whl
