#!/usr/bin/env bash
# The GPU suite on a CUDA machine whose image lacks litdata and jsonargparse and reaches no package index
# (docs/benchmarks.md): their wheels travel with the checkout in .whl/ (benchmarks/fetch_gpu_wheels.sh
# downloads them on a machine that has the index), are installed into /tmp/site, and the checkout itself
# is imported from its folder. Arguments go to benchmarks/gpu_suite.py.
#
#     bash benchmarks/gpu_suite.sh --out gpu_suite.json
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${DIFFV2_LIT_SITE:-/tmp/site}
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
if ! python3 -c "import litdata, jsonargparse" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "litdata/jsonargparse are missing and .whl/ holds no wheels: run benchmarks/fetch_gpu_wheels.sh first" >&2
    exit 2
  fi
  python3 -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
fi
export LITDATA_DISABLE_VERSION_CHECK=1
exec python3 benchmarks/gpu_suite.py "$@"
