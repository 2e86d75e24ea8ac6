#!/usr/bin/env bash
# The engine benchmark: kiln (candle) and diffusers (PyTorch) on the same random full-size SD1.5
# weights, CPU f32, THREADS threads, alternated: ROUNDS rounds of kiln then PyTorch, each a fresh
# process, the load average recorded before each; then the medians. See tools/bench/README.md.
#   tools/bench/run.sh [MODEL_DIR] [PYTHON] [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-/tmp/kiln-bench/sd15-random}
python=${2:-/work/venv/bin/python}
rounds=${3:-3}
threads=${4:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
[ -d "$model/unet" ] || "$python" tools/bench/make_sd15_random.py "$model"
# Built as users get it (release), once, before any timing.
cargo bench -q --locked -p kiln-worker --bench engine --profile release --no-run 2>/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for r in $(seq "$rounds"); do
    echo "round $r kiln, load $(cut -d' ' -f1-3 /proc/loadavg)"
    RAYON_NUM_THREADS=$threads cargo bench -q --locked -p kiln-worker --bench engine --profile release -- "$model" \
        | tail -1 | tee "$out/kiln-$r.json"
    echo "round $r PyTorch, load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$python" tools/bench/bench_diffusers.py "$model" --threads "$threads" --profile 2>/dev/null \
        | tail -1 | tee "$out/torch-$r.json"
done
echo "end, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$python" tools/bench/compare.py --kiln "$out"/kiln-*.json --torch "$out"/torch-*.json
