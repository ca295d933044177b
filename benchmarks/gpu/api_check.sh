#!/usr/bin/env bash
# Our exllamav3 adapter against a release of the library in about a minute, no CUDA build: the checks
# `pytest -m exllama` runs (the library's own generator, jobs, page table, sampler steps and grammar
# filter over our backend, forward taken out; gpu_serving.py's raw and server sides over them) with the
# compiled extension stood in by ext_stand_in/exllama_ext_stand_in.py (in child processes too: its
# sitecustomize.py). For a new exllamav3 release, before cross_build.sh's ~25-minute build or a GPU lease. exllamav2's sampler is compiled code, so its generator checks skip
# here (cpu_check.sh runs them on the real modules); every keyword our exllamav2 adapter passes is
# still checked against the release's signatures (tests/test_exllama_api_surface.py).
#
#   bash benchmarks/gpu/api_check.sh [VERSION] [pytest args]     # VERSION: e.g. 1.6.5; default the newest
#   EXL2_VERSION=0.3.0 bash benchmarks/gpu/api_check.sh          # an exllamav2 release (default the newest)
#
# Installs nothing into .venv: the wheels (no dependencies) and the two the project's venv lacks
# (marisa-trie, triton) go to $API_CHECK_DIR/<version> and $API_CHECK_DIR/exllamav2-<version>
# (default /tmp/xllm-api-check).
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then VERSION=$1; shift; fi  # a first argument not an option
DIR=${API_CHECK_DIR:-/tmp/xllm-api-check}/${VERSION:-newest}
DIR2=${API_CHECK_DIR:-/tmp/xllm-api-check}/exllamav2-${EXL2_VERSION:-newest}
if [ ! -d "$DIR/exllamav3" ]; then
  .venv/bin/python -m pip install -q --no-deps --target "$DIR" "exllamav3${VERSION:+==$VERSION}" marisa-trie triton
fi
if [ ! -d "$DIR2/exllamav2" ]; then
  # (exllamav2 0.3.0-0.3.1 import sentencepiece, which the project's venv lacks)
  .venv/bin/python -m pip install -q --no-deps --target "$DIR2" "exllamav2${EXL2_VERSION:+==$EXL2_VERSION}" sentencepiece
fi
echo "checking against $(basename "$(ls -d "$DIR"/exllamav3-*.dist-info)" .dist-info)," \
  "$(basename "$(ls -d "$DIR2"/exllamav2-*.dist-info)" .dist-info)"
PYTHONPATH="$PWD/benchmarks/gpu/ext_stand_in:$DIR:$DIR2${PYTHONPATH:+:$PYTHONPATH}" \
  exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider \
  -o filterwarnings=ignore::DeprecationWarning -m exllama \
  tests/test_prefix_isolation_library.py tests/test_exllama_library_serving.py tests/test_exllama_adapters.py \
  tests/test_exllama_api_surface.py tests/test_benchmark_tools.py "$@"
