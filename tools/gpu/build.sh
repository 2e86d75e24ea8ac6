#!/usr/bin/env bash
# Builds kiln with CUDA, from nothing but PyPI: the pinned CUDA 13.0 toolkit is installed into
# target/cuda-toolkit (no system install, no root), the build goes to target/cuda, and the
# stripped binary to target/kiln-cuda/kiln.
#
#   tools/gpu/build.sh            release build of `kiln` with CUDA, stripped
#   tools/gpu/build.sh --bundle   the same, plus the CUDA libraries it needs in target/kiln-cuda/lib
#                                 (found there at run time through the binary's rpath)
#   tools/gpu/build.sh --check    only `cargo clippy --features cuda` over the workspace (CI);
#                                 needs the compiler wheels only, links nothing
#
# Environment:
#   CUDA_COMPUTE_CAP   the architecture candle's kernels are compiled for (default 75). Its PTX
#                      runs on that generation and every newer one: 75 covers Turing (RTX 20xx),
#                      Ampere (30xx, A100), Ada (40xx), Hopper (H100/H200) and Blackwell (50xx);
#                      newer cards compile the PTX once at first start (the driver's JIT, cached
#                      in ~/.nv/ComputeCache). 80+ enables bf16 kernels; 90 gives sm_90a code that
#                      runs on Hopper only. CUDA 13 has no target below 75 (no GTX 10xx).
#   KILN_CUDA_TOOLKIT  where the toolkit goes (default target/cuda-toolkit)
#   CARGO_TARGET_DIR   for the release build, default target/cuda (apart from the CPU build)
#
# The result needs, at run time, the NVIDIA driver (libcuda.so.1; driver 580 or newer for
# CUDA 13.0) and the CUDA 13 runtime, cuBLAS, cuBLASLt, cuRAND and NVRTC (a CUDA 13 toolkit,
# the `--bundle` folder, or the same PyPI wheels on LD_LIBRARY_PATH). It does not start at all on a
# machine without the driver: coordinators and CPU-only PCs run the CPU build.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

mode=build
case "${1:-}" in
    "") ;;
    --bundle) mode=bundle ;;
    --check) mode=check ;;
    *) echo "usage: $0 [--bundle|--check]" >&2; exit 2 ;;
esac

# The toolkit, pinned to CUDA 13.0: PTX from a newer nvcc does not load on a 13.0 driver.
compiler=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
)
libraries=(
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
    nvidia-cuda-nvrtc==13.0.88
)
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-75}"
toolkit="${KILN_CUDA_TOOLKIT:-$root/target/cuda-toolkit}"
# The check shares target/ with the CPU build (dependencies without a cuda feature are not
# checked twice); the release build has its own, since its RUSTFLAGS differ.
[ "$mode" = check ] || export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"

wheels=("${compiler[@]}")
[ "$mode" = check ] || wheels+=("${libraries[@]}")
stamp="$toolkit/.installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    echo "build.sh: installing the CUDA 13.0 toolkit from PyPI into $toolkit" >&2
    python3 -m venv "$toolkit/venv"
    "$toolkit/venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
        "${wheels[@]}"
    touch "$stamp"
fi
cu="$("$toolkit/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
# Wheels may lose their run bits.
chmod +x "$cu"/bin/* "$cu"/nvvm/bin/* 2>/dev/null || true

if [ "$mode" != check ]; then
    # The linker wants unversioned names; cudarc looks in $CUDA_HOME/lib and lib/stubs.
    for lib in cublas cublasLt nvrtc cudart; do ln -sfn "lib$lib.so.13" "$cu/lib/lib$lib.so"; done
    ln -sfn libcurand.so.10 "$cu/lib/libcurand.so"
    # A stub libcuda for the link only (the driver's own is found at run time; never ship or
    # load this one): every driver-API name that cuda.h declares or #defines to, as an empty
    # function, with the driver's soname.
    if [ ! -e "$cu/lib/stubs/libcuda.so" ]; then
        mkdir -p "$cu/lib/stubs"
        {
            grep -oE 'CUDAAPI +cu[A-Za-z0-9_]+' "$cu/include/cuda.h" | awk '{print $2}'
            grep -oE '^#define +cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' "$cu/include/cuda.h" | awk '{print $2; print $3}'
        } | sort -u | sed 's/.*/int &(void) { return 999; }/' > "$toolkit/libcuda-stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$toolkit/libcuda-stub.c"
    fi
fi

export CUDA_HOME="$cu" CUDA_PATH="$cu" PATH="$cu/bin:$PATH"
echo "build.sh: nvcc $(nvcc --version | grep -oE 'release [0-9.]+'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2

if [ "$mode" = check ]; then
    cargo clippy --workspace --all-targets --locked --features kiln-cli/cuda -- -D warnings
    exit 0
fi

# $ORIGIN/lib: the --bundle folder beside the binary is searched before the system's.
RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,\$ORIGIN/lib" \
    cargo build --release --locked -p kiln-cli --features cuda
out="$root/target/kiln-cuda"
rm -rf "$out"
mkdir -p "$out"
strip -o "$out/kiln" "$CARGO_TARGET_DIR/release/kiln"
if [ "$mode" = bundle ]; then
    mkdir -p "$out/lib"
    for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 \
        libnvrtc-builtins.so.13.0 libcudart.so.13; do
        cp -L "$cu/lib/$lib" "$out/lib/"
    done
fi
du -sh "$out"/* >&2
echo "build.sh: done: $out/kiln (run \`$out/kiln devices\` on the GPU machine)" >&2
