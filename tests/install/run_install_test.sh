#!/usr/bin/env bash
# ctest install.outside_project: installs the build tree $1 into a temporary prefix under $2 and
# builds outside/ against it the two ways README "Embedding" shows -- CMake find_package (shared and
# static targets) and a plain compiler line with pkg-config (shared, and --static) -- and runs each
# program. Also checks the installed libcollapse.so: SONAME, exports = the functions of collapse.h,
# no CUDA library needed (nor by the CLI), that it finds an installed CUDA module beside itself, and
# (argument 3, the fake module of tests/unit) that an error thrown inside a module reaches its C API.
set -euo pipefail
build="$1"
work="$2"
fake="${3:-}"  # tests/unit/fake_cuda_module, when built
here="$(cd "$(dirname "$0")" && pwd)"
cc="${CC:-cc}"
fail() { echo "install test: $*" >&2; exit 1; }

rm -rf "$work"
mkdir -p "$work"
prefix="$work/prefix"
cmake --install "$build" --prefix "$prefix" > "$work/install.log"
so="$(find "$prefix" -name libcollapse.so -print -quit)"
[ -n "$so" ] || fail "no libcollapse.so under $prefix"
lib="$(dirname "$so")"
for f in libcollapse.a libcollapse.so.0 pkgconfig/collapse.pc cmake/collapse/collapseConfig.cmake \
         cmake/collapse/collapseConfigVersion.cmake cmake/collapse/collapseTargets.cmake; do
  [ -e "$lib/$f" ] || fail "not installed: $lib/$f"
done
[ -f "$prefix/include/collapse/collapse.h" ] || fail "collapse.h not installed"

# The shared library: versioned SONAME, exactly the C API exported, no CUDA library needed.
readelf -d "$so" | grep -q 'SONAME.*\[libcollapse\.so\.0\]' || fail "SONAME is not libcollapse.so.0: $(readelf -d "$so" | grep SONAME)"
[ "$(readlink "$lib/libcollapse.so.0")" = "libcollapse.so.0.1.0" ] || fail "libcollapse.so.0 -> $(readlink "$lib/libcollapse.so.0")"
nm -D --defined-only "$so" | awk '{print $3}' | sort > "$work/exported.txt"
grep -oE '\bcollapse_[a-z0-9_]+[[:space:]]*\(' "$prefix/include/collapse/collapse.h" | tr -d ' (' | sort -u > "$work/declared.txt"
diff "$work/declared.txt" "$work/exported.txt" > "$work/exports.diff" \
  || fail "exports of libcollapse.so differ from collapse.h (< declared only, > exported only): $(cat "$work/exports.diff")"
cuda_re='libcuda\.|libcudart|libcublas|libcusolver|libcusparse|libnvJitLink'
for bin in "$so" "$prefix/bin/collapse"; do
  [ -e "$bin" ] || continue
  if readelf -d "$bin" | grep NEEDED | grep -Eq "$cuda_re"; then fail "$bin needs a CUDA library"; fi
done

# What the consumer says about backend cuda: with the module installed beside libcollapse.so it is
# found there (this machine may lack a device); otherwise its absence is reported.
check_cuda_line() {  # $1: consumer output
  if [ -e "$lib/libcollapse_cuda.so" ]; then
    echo "$1" | grep -Eq "backend cuda: (available|.*the CUDA module $lib/libcollapse_cuda.so is loaded)" \
      || fail "the installed CUDA module was not found beside libcollapse.so: $1"
  fi
}

# (a) CMake: find_package(collapse CONFIG), both targets.
cmake -S "$here/outside" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > "$work/cmake.log" 2>&1 \
  || { cat "$work/cmake.log"; fail "configuring the outside project failed"; }
cmake --build "$work/cmake" > "$work/cmake_build.log" 2>&1 || { cat "$work/cmake_build.log"; fail "building the outside project failed"; }
out="$("$work/cmake/consumer_shared")" || fail "consumer_shared (collapse::collapse) failed: $out"
echo "cmake, collapse::collapse:        $out"
check_cuda_line "$out"
readelf -d "$work/cmake/consumer_shared" | grep -q 'NEEDED.*libcollapse\.so\.0' || fail "consumer_shared does not link libcollapse.so.0"
if [ -n "$fake" ]; then  # an Error thrown inside a module, caught by libcollapse.so's C API
  COLLAPSE_CUDA_MODULE="$fake" "$work/cmake/consumer_shared" fake || fail "the fake module's error did not reach the C API"
fi
out="$("$work/cmake/consumer_static")" || fail "consumer_static (collapse::collapse_static) failed: $out"
echo "cmake, collapse::collapse_static: $out"
if readelf -d "$work/cmake/consumer_static" | grep -q 'NEEDED.*libcollapse'; then fail "consumer_static needs libcollapse.so"; fi

# (b) pkg-config, a plain compiler line.
export PKG_CONFIG_PATH="$lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# shellcheck disable=SC2046
"$cc" "$here/outside/consumer.c" -o "$work/pc_shared" $(pkg-config --cflags --libs collapse) -lm -Wl,-rpath,"$lib" \
  || fail "cc \$(pkg-config --cflags --libs collapse) failed"
out="$("$work/pc_shared")" || fail "pc_shared failed: $out"
echo "pkg-config:                       $out"
check_cuda_line "$out"
# Static: libcollapse.a plus Libs.private/Requires.private (-lcollapse itself named as the archive).
# shellcheck disable=SC2046
"$cc" "$here/outside/consumer.c" -o "$work/pc_static" $(pkg-config --static --cflags --libs collapse | sed 's/-lcollapse\b/-l:libcollapse.a/') -lm \
  || fail "cc \$(pkg-config --static --cflags --libs collapse) failed"
if readelf -d "$work/pc_static" | grep -q 'NEEDED.*libcollapse'; then fail "pc_static needs libcollapse.so"; fi
out="$("$work/pc_static")" || fail "pc_static failed: $out"
echo "pkg-config --static:              $out"
echo "install test: 4 outside programs built and run against $prefix"
