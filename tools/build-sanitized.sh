#!/bin/sh
# An AddressSanitizer + UBSan build of the cffi extension, and the tests that
# exercise the datapath run against it (docs/reliability.md "Fuzzing").
#
#   tools/build-sanitized.sh            build build/asan/, then run the tests
#   tools/build-sanitized.sh --build    only build
#
# build/asan/nitro/ is a copy of the nitro package whose _nitro_c extension is
# compiled by cffi_build/build.py's own builder with -fsanitize=address,undefined
# (UBSan aborts on the first report). Python itself is not instrumented, so
# libasan is preloaded and leak checking is off (CPython's allocations would
# all be reported). Run from anywhere; uses the project venv.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/build/asan
PY=${PY:-$ROOT/.venv/bin/python}
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

rm -rf "$OUT"
mkdir -p "$OUT/obj"
# The package's Python files (not its in-tree extension) next to the new one.
(cd "$ROOT" && find nitro -name '*.py' -o -name '*.toml' | grep -v __pycache__ |
    cpio -pdm --quiet "$OUT")
# From outside the repo root, build.py names its sources by absolute path.
# CXXFLAGS too: setuptools compiles the one C++ file (nitro_rbd_bl.cpp) with
# them instead of CFLAGS.
(cd "$OUT/obj" && CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="$SAN" "$PY" -c '
import sys, shutil
sys.path.insert(0, sys.argv[3])
import build
so = build.make_builder().compile(tmpdir=sys.argv[1], verbose=False)
shutil.copy(so, sys.argv[2])
' "$OUT/obj" "$OUT/nitro/" "$ROOT/cffi_build")
echo "build-sanitized: $(ls "$OUT"/nitro/_nitro_c*.so)"
[ "${1:-}" = "--build" ] && exit 0

LIBASAN=$(gcc -print-file-name=libasan.so)
export LD_PRELOAD="$LIBASAN"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$OUT"
export NITRO_EXPECT_EXTENSION="$OUT/nitro"
cd "$ROOT"
# The pytest script (not python -m, which would put the repo first on
# sys.path) with append import mode, so `import nitro` finds build/asan.
"$ROOT/.venv/bin/pytest" -q -p no:cacheprovider --import-mode=append \
    tests/fuzz/test_sanitized.py tests/unit/test_datapath_*.py tests/unit/test_net_switch.py tests/unit/test_net_tso.py \
    tests/unit/test_qos.py tests/unit/test_crypto_xts.py tests/unit/test_seccomp.py \
    tests/fuzz/test_fuzz.py -k 'not short_fuzz_run'
