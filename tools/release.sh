#!/usr/bin/env bash
# Release builds of `kiln`, stripped, with a SHA256SUMS file, into dist/:
#
#   kiln-VERSION-linux-x86_64-cpu.tar.gz       the CPU build (coordinators, CPU-only PCs)
#   kiln-VERSION-linux-x86_64-cuda.tar.gz      CUDA 13 build with its CUDA libraries (tools/gpu/build.sh --bundle)
#   kiln-VERSION-windows-x86_64-cpu.zip        kiln.exe for Windows (mingw-w64 cross-build)
#
#   tools/release.sh                 all three
#   tools/release.sh linux-cpu windows-cpu   only those
#
# Needs: for windows-cpu, rustup's x86_64-pc-windows-gnu target and Debian's gcc-mingw-w64-x86-64
# (`rustup target add x86_64-pc-windows-gnu; apt install gcc-mingw-w64-x86-64`); for linux-cuda,
# what tools/gpu/build.sh needs (PyPI). Each release build takes about 15 minutes on 2 cores.
#
# Not built: a Windows CUDA binary. candle's CUDA kernels and cuBLAS need NVIDIA's toolkit for
# Windows and the MSVC toolchain, which a Linux machine cannot cross-compile with; Windows PCs
# with NVIDIA cards run the CPU build until a Windows machine builds it
# (`cargo build --release -p kiln-cli --features cuda` there).
set -euo pipefail
cd "$(dirname "$0")/.."

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
dist="$PWD/dist"
mkdir -p "$dist"
log() { echo "tools/release.sh: $*" >&2; }

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(linux-cpu linux-cuda windows-cpu)

for t in "${targets[@]}"; do
    case "$t" in
        linux-cpu)
            log "linux-cpu: cargo build --release"
            cargo build --release --locked -p kiln-cli
            stage="$(mktemp -d)/kiln-$version-linux-x86_64-cpu"
            mkdir -p "$stage"
            cp target/release/kiln "$stage/"
            strip "$stage/kiln"
            cp README.md "$stage/"
            tar -C "$(dirname "$stage")" -czf "$dist/$(basename "$stage").tar.gz" "$(basename "$stage")"
            ;;
        linux-cuda)
            log "linux-cuda: tools/gpu/build.sh --bundle"
            tools/gpu/build.sh --bundle
            stage="$(mktemp -d)/kiln-$version-linux-x86_64-cuda"
            mkdir -p "$stage"
            cp -r target/kiln-cuda/. "$stage/"
            cp README.md "$stage/"
            tar -C "$(dirname "$stage")" -czf "$dist/$(basename "$stage").tar.gz" "$(basename "$stage")"
            ;;
        windows-cpu)
            log "windows-cpu: cargo build --release --target x86_64-pc-windows-gnu"
            cargo build --release --locked --target x86_64-pc-windows-gnu -p kiln-cli
            stage="$(mktemp -d)/kiln-$version-windows-x86_64-cpu"
            mkdir -p "$stage"
            cp target/x86_64-pc-windows-gnu/release/kiln.exe "$stage/"
            x86_64-w64-mingw32-strip "$stage/kiln.exe"
            cp README.md "$stage/"
            (cd "$(dirname "$stage")" && python3 -m zipfile -c "$dist/$(basename "$stage").zip" "$(basename "$stage")")
            ;;
        *)
            echo "usage: $0 [linux-cpu] [linux-cuda] [windows-cpu]" >&2
            exit 2
            ;;
    esac
done

(cd "$dist" && sha256sum kiln-"$version"-* > SHA256SUMS)
log "done: $dist"
cat "$dist/SHA256SUMS"
