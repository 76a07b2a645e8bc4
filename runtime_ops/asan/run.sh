#!/usr/bin/env bash
# AddressSanitizer target: build the op library with -DONNXZERO_ASAN=ON and run the op tests under it.
#
#   runtime_ops/asan/run.sh [BUILD_DIR] [pytest args...]
#
# BUILD_DIR defaults to build/asan (relative to the repository root). Extra arguments go to pytest
# (e.g. -k 'not slow', or test files instead of the default tests/test_op_*.py). onnxruntime's headers
# come from $ONNXRUNTIME_INCLUDE_DIR, else a copy an earlier build fetched, else CMake fetches them.
# Environment: ONNXZERO_HYPOTHESIS_EXAMPLES (default 8) caps hypothesis examples per test; PYTHON the
# interpreter whose onnxzero is tested (default: python on PATH).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${1:-$ROOT/build/asan}
[ $# -gt 0 ] && shift
case "$BUILD" in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac

ASAN_LIB=$(gcc -print-file-name=libasan.so)
if [ ! -e "$ASAN_LIB" ] || [ "$ASAN_LIB" = "libasan.so" ]; then
  echo "asan: libasan.so not found (gcc -print-file-name=libasan.so gave '$ASAN_LIB')" >&2
  exit 77
fi

HDR=${ONNXRUNTIME_INCLUDE_DIR:-}
if [ -z "$HDR" ]; then
  for d in "$BUILD"/onnxruntime-headers/x/usr/include/onnxruntime "$ROOT"/build/*/onnxruntime-headers/x/usr/include/onnxruntime \
           /usr/include/onnxruntime /tmp/hdr/x/usr/include/onnxruntime; do
    if [ -e "$d/onnxruntime_c_api.h" ]; then HDR=$d; break; fi
  done
fi

GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
if [ ! -e "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DONNXZERO_ASAN=ON ${HDR:+-DONNXRUNTIME_INCLUDE_DIR=$HDR} >/dev/null
else
  cmake -S "$ROOT" -B "$BUILD" -DONNXZERO_ASAN=ON >/dev/null
fi
cmake --build "$BUILD" >/dev/null
LIB=$BUILD/runtime_ops/libonnxzero_ops.so
[ -e "$LIB" ] || { echo "asan: $LIB was not built" >&2; exit 1; }

cd "$ROOT"
TESTS=()
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then TESTS=(tests/test_op_*.py); fi
# detect_leaks=0: CPython and onnxruntime keep allocations until exit by design.
# halt_on_error=1 + abort: an ASan report fails the test process instead of passing silently.
# libstdc++ is preloaded too: python does not link it, and ASan must see the real __cxa_throw at start-up
# (else its interceptor aborts on the first C++ exception, e.g. every error-path test).
STDCXX=$(gcc -print-file-name=libstdc++.so)
export LD_PRELOAD="$ASAN_LIB${STDCXX:+ $STDCXX}"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}
export ONNXZERO_LIBRARY=$LIB
export ONNXZERO_HYPOTHESIS_EXAMPLES=${ONNXZERO_HYPOTHESIS_EXAMPLES:-8}
# -P: import the installed onnxzero (passes/ and cli/ live inside it), not the source tree in the cwd
exec "${PYTHON:-python}" -P -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
