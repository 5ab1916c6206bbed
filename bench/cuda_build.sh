#!/usr/bin/env bash
# Compile kiln with `--features cuda` on a Linux x86_64 machine that has no GPU and no
# system CUDA: nvcc, the headers and the libraries come from NVIDIA's PyPI wheels in a
# venv, arranged as a toolkit directory. Nothing runs on a GPU; this only proves the
# CUDA build compiles and links.
#   bench/cuda_build.sh [extra cargo args...]
# Environment (all optional):
#   CUDA_COMPUTE_CAP      GPU arch the kernels are compiled for (default 80 = A100; 90 = H100).
#                         Needed because the kernel build asks nvidia-smi otherwise.
#   KILN_CUDA_VENV        venv holding the wheels        (default target/cuda-venv)
#   KILN_CUDA_TOOLKIT     toolkit directory assembled    (default target/cuda-toolkit)
#   KILN_CUDA_TARGET_DIR  cargo target dir               (default target/cuda)
#   KILN_CUDA_SETUP_ONLY  1: set up the toolkit, print the exports to eval, skip cargo
#   CUDAFORGE_THREADS     parallel nvcc jobs in candle-kernels' build (cudaforge default: half the cores)
# Running the binary needs a real driver (libcuda.so.1) and LD_LIBRARY_PATH=<toolkit>/lib64.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)

venv=${KILN_CUDA_VENV:-$root/target/cuda-venv}
toolkit=${KILN_CUDA_TOOLKIT:-$root/target/cuda-toolkit}
target_dir=${KILN_CUDA_TARGET_DIR:-$root/target/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}

# CUDA 13.4, the components that cuda-toolkit==13.4.3 (NVIDIA's meta-package) pins.
# 13.x because the cu12 nvcc wheels (12.4.131 and 12.9.86 checked) hold only ptxas and
# libnvvm, no nvcc/cicc/cudafe++;
# 13.4 because it is the newest release cudarc 0.19.10's build script accepts (13.5 panics).
pins=(
  nvidia-cuda-nvcc==13.4.92     # nvcc, ptxas, cudafe++, fatbinary, nvlink
  nvidia-cuda-crt==13.4.92      # include/crt/*, which nvcc includes for every .cu
  nvidia-nvvm==13.4.92          # nvvm/bin/cicc, libdevice
  nvidia-cuda-runtime==13.4.92  # cuda_runtime.h, cuda_fp16/bf16/fp8.h, cuda.h, libcudart
  nvidia-cuda-nvrtc==13.4.92    # libnvrtc (cudarc links it)
  nvidia-cuda-cccl==13.3.4.3.1  # include/cccl: thrust, cub, cuda/std (candle's reduce and moe kernels)
  nvidia-cublas==13.8.0.4       # libcublas, libcublasLt
  nvidia-curand==10.4.4.72      # libcurand
)

stamp=$venv/.kiln-cuda-pins
if [[ ! -x $venv/bin/python ]]; then
  echo "== creating venv $venv"
  python3 -m venv "$venv"
fi
# A stamp instead of always calling pip, so a rerun works offline and costs nothing.
if [[ ! -f $stamp || "$(cat "$stamp")" != "${pins[*]}" ]]; then
  echo "== installing CUDA wheels (~1.2 GB on disk, half of it cuBLASLt)"
  "$venv/bin/python" -m pip install --disable-pip-version-check "${pins[@]}"
  printf '%s' "${pins[*]}" > "$stamp"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
cu=$site/nvidia/cu13
[[ -x $cu/bin/nvcc && -x $cu/nvvm/bin/cicc && -f $cu/include/crt/host_config.h && -d $cu/include/cccl/cub ]] || {
  echo "the wheels in $venv are incomplete: expected nvcc, cicc, crt and cccl under $cu" >&2; exit 1; }

echo "== assembling toolkit $toolkit"
# Rebuilt each run (symlinks and one tiny .so, well under a second) so it always matches the venv.
rm -rf "$toolkit"
mkdir -p "$toolkit/lib64/stubs"
# nvcc finds cicc, crt and cccl relative to itself (bin/nvcc.profile: TOP=$(_HERE_)/..), and
# the wheel dir is already laid out that way; whole-dir links keep that true whichever way
# nvcc resolves its own path.
ln -s "$cu/bin" "$toolkit/bin"
ln -s "$cu/include" "$toolkit/include"
ln -s "$cu/nvvm" "$toolkit/nvvm"
# The wheels ship only versioned sonames (libcudart.so.13); `-lcudart` and friends need the
# unversioned names. cudaforge (candle-kernels) also derives lib64 from nvcc's location.
for lib in "$cu"/lib/lib*.so.*; do
  name=$(basename "$lib")
  ln -sf "$lib" "$toolkit/lib64/$name"
  ln -sf "$lib" "$toolkit/lib64/${name%%.so.*}.so"
done
for lib in "$cu"/lib/lib*.a; do ln -sf "$lib" "$toolkit/lib64/"; done
ln -s lib64 "$toolkit/lib"

# candle enables cudarc's `dynamic-linking`, so the final link has `-lcuda`. libcuda is the
# driver's library: no wheel ships it, and without a GPU no driver is installed. Like the
# toolkit's lib64/stubs/libcuda.so, this stub only satisfies the linker; its soname is
# libcuda.so.1, so at run time the loader picks the real driver and never this file.
# Its symbols: every function cuda.h declares (after the _v2/_v3 renaming macros) plus
# every one cudarc's bindings name, whatever version they are gated on.
lock_ver() { awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock; }
cudarc_ver=$(lock_ver cudarc)
cargo_home=${CARGO_HOME:-$HOME/.cargo}
find_cudarc() { compgen -G "$cargo_home/registry/src/*/cudarc-$cudarc_ver/src/driver/sys/mod.rs" | head -1 || true; }
cudarc_sys=$(find_cudarc)
if [[ -z $cudarc_sys ]]; then
  cargo fetch --quiet
  cudarc_sys=$(find_cudarc)
fi
{
  printf '#include <cuda.h>\n' | ${CC:-cc} -E -P -x c -I "$cu/include" - \
    | tr '\n' ' ' | grep -oE '\bCUresult +cu[A-Za-z0-9_]+ *\(' | sed -E 's/^CUresult +//; s/ *\($//'
  if [[ -n $cudarc_sys ]]; then
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc_sys" | sed -E 's/^pub unsafe fn //; s/\($//'
  else
    echo "warning: cudarc-$cudarc_ver sources not found; libcuda stub has cuda.h's symbols only" >&2
  fi
} | sort -u | awk '{ print "int " $1 "(void) { return 999; }" }' > "$toolkit/lib64/stubs/libcuda_stub.c"
${CC:-cc} -shared -fPIC -o "$toolkit/lib64/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 \
  "$toolkit/lib64/stubs/libcuda_stub.c"
echo "   libcuda stub: $(grep -c . "$toolkit/lib64/stubs/libcuda_stub.c") symbols"

release=$("$toolkit/bin/nvcc" --version | sed -nE 's/.*release ([0-9]+)\.([0-9]+),.*/\1 \2/p')
read -r major minor <<< "$release"

# cudarc's build.rs reads CUDA_HOME/CUDA_PATH/CUDA_ROOT/CUDA_TOOLKIT_ROOT_DIR for its -L
# paths (lib64, lib64/stubs) and falls back to /usr, /usr/local/cuda... if none is set.
export CUDA_HOME=$toolkit CUDA_PATH=$toolkit CUDA_ROOT=$toolkit CUDA_TOOLKIT_ROOT_DIR=$toolkit
# cudaforge takes $NVCC first, then nvcc on PATH; cudarc runs `nvcc --version` from PATH
# unless CUDARC_CUDA_VERSION is set, which pins the bindings to the toolkit we just checked.
export NVCC=$toolkit/bin/nvcc
export PATH=$toolkit/bin:$PATH
export CUDARC_CUDA_VERSION=${major}0${minor}0
# Not needed to link (libcublas finds libcublasLt through its $ORIGIN rpath), but the
# printed exports should also let the built binary find the wheels' libraries at run time.
export LD_LIBRARY_PATH=$toolkit/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

echo "   nvcc $major.$minor, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, host compiler $(${CXX:-g++} -dumpfullversion 2>/dev/null || echo '?')"
if [[ ${KILN_CUDA_SETUP_ONLY:-0} == 1 ]]; then
  for v in CUDA_HOME CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR NVCC PATH CUDARC_CUDA_VERSION LD_LIBRARY_PATH CUDA_COMPUTE_CAP; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  exit 0
fi

echo "== cargo build --release --features cuda --target-dir $target_dir $*"
build_start=$(date +%s)
cargo build --release --features cuda --target-dir "$target_dir" "$@"
end=$(date +%s)
echo "== cuda build took $((end - build_start))s (setup $((build_start - start))s, total $((end - start))s)"
