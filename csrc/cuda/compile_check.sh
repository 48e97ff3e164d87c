#!/usr/bin/env bash
# Compile-check the CUDA scoring kernels with plain nvcc (no torch headers, no GPU needed):
# every csrc/cuda/*.cu is compiled with `nvcc -c` for ARCH (default sm_90) into a temporary folder,
# with warnings and register spills as errors, and with the flags torch's extension builder adds
# (no implicit half/bf16 conversions). Then, where python3 imports torch and a host compiler is
# there, the torch binding (binding.cpp) is syntax-checked against torch's headers (a CPU build of
# torch lacks c10/cuda/impl/cuda_cmake_macros.h: a stub stands in for it). Exit status 0 = all pass.
#
#   bash csrc/cuda/compile_check.sh            # NVCC=/path/to/nvcc ARCH=sm_89 CXX=g++ to override
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NVCC=${NVCC:-nvcc}
ARCH=${ARCH:-sm_90}
CXX=${CXX:-g++}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_check: $NVCC not found" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
             -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
for cu in "$here"/*.cu; do
  name=$(basename "$cu" .cu)
  if "$NVCC" -c -std=c++17 -O3 -arch="$ARCH" --Werror all-warnings -Xptxas -warn-spills "${torch_flags[@]}" \
       -Xcompiler -fPIC -I"$here" "$cu" -o "$tmp/$name.o" >"$tmp/$name.log" 2>&1; then
    echo "ok      $name.cu ($ARCH)"
  else
    echo "FAILED  $name.cu ($ARCH)"
    cat "$tmp/$name.log"
    failed=1
  fi
done

# the binding: syntax only (linking needs torch's CUDA libraries, which a CPU machine lacks)
if includes=$(python3 -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))" 2>/dev/null) \
    && command -v "$CXX" >/dev/null 2>&1; then
  args=()
  for d in "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$(dirname "$(command -v "$NVCC")")")/include" \
           /usr/local/cuda/include; do
    if [ -f "$d/cuda_runtime.h" ]; then args+=(-I"$d"); break; fi
  done
  while IFS= read -r p; do args+=(-I"$p"); done <<<"$includes"
  torch_inc=$(head -1 <<<"$includes")
  if [ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$tmp/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    args+=(-I"$tmp/stub")
  fi
  if "$CXX" -std=c++20 -fsyntax-only "${args[@]}" -I"$here" "$here/binding.cpp" >"$tmp/binding.log" 2>&1; then
    echo "ok      binding.cpp (syntax, torch headers)"
  else
    echo "FAILED  binding.cpp (syntax, torch headers)"
    cat "$tmp/binding.log"
    failed=1
  fi
else
  echo "skipped binding.cpp (no python3 with torch, or no $CXX)"
fi
exit $failed
