#!/usr/bin/env bash
# The engine benchmark: kiln (candle) and diffusers (PyTorch) on the same random full-size SD1.5
# weights, CPU f32, 2 threads, one after the other. See tools/bench/README.md.
#   tools/bench/run.sh [MODEL_DIR] [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-/tmp/kiln-bench/sd15-random}
python=${2:-/work/venv/bin/python}
out=$(mktemp -d)
[ -d "$model/unet" ] || "$python" tools/bench/make_sd15_random.py "$model"
echo "start: $(uptime)"
RAYON_NUM_THREADS=2 cargo bench -q -p kiln-worker --bench engine --profile dev -- "$model" | tail -1 > "$out/kiln.json"
echo "kiln done: $(uptime)"
"$python" tools/bench/bench_diffusers.py "$model" --threads 2 --profile 2>/dev/null | tail -1 > "$out/diffusers.json"
echo "diffusers done: $(uptime)"
cat "$out/kiln.json" "$out/diffusers.json"
"$python" tools/bench/compare.py "$out/kiln.json" "$out/diffusers.json"
