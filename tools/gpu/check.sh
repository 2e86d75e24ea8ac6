#!/usr/bin/env bash
# Every GPU measurement of the GPU-workers issue in one run, for the lent GPU machine (PyTorch with
# CUDA there, no Rust, no network). Build and pack here first:
#
#   tools/gpu/build.sh                                   # target/kiln-cuda/kiln
#   mkdir -p gpu-carry && xz -T0 -6 -c target/kiln-cuda/kiln > gpu-carry/kiln.xz
#   pip download --no-deps -d gpu-carry diffusers==0.42.1
#   echo gpu-carry >> .git/info/exclude
#
# then, on the device (`run` tool, carry gpu-carry; results under $OUT):
#
#   bash tools/gpu/check.sh gpu-carry
#
# Parts, each timed and written to $OUT as it finishes, so a run cut short keeps what it had:
#   devices  kiln devices
#   speed    kiln bench and bench_diffusers.py, alternated twice, 512², LCM 4 steps, CFG 1, batch 1
#            and 8; then CFG 1.5 and 768² once each
#   parity   seeds 1 and 2 at 512²: kiln cuda vs kiln cpu vs diffusers fp16 (compare_png.py)
#   farm     `kiln run` of 32 cells at 512² (embedded SQLite coordinator, one worker, file storage)
#            against `kiln bench` at the same settings: images/s of the farm ÷ the bare engine
#   oom      with the card filled by a PyTorch allocation, a sweep whose first cell cannot fit
#            and whose second can: the first fails as RESOURCE, the second renders
# Not yet run on a GPU by anyone: expect to fix what the first run shows. Its orchestration was
# checked on the CPU with the tiny test model:
#   KILN_BIN=target/debug/kiln KILN_CHECK_DEVICE=cpu KILN_CHECK_MODEL=worker/tests/fixtures/reference/tiny-sd15 \
#   KILN_CHECK_SIZES="64 128" KILN_CHECK_BATCHES=1,2 bash tools/gpu/check.sh none
set -uo pipefail
carry=${1:?usage: check.sh CARRY_DIR}
OUT=${OUT:-/tmp/kiln-gpu-out}
mkdir -p "$OUT"
work=$(mktemp -d)
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }
dev=${KILN_CHECK_DEVICE:-cuda:0}
tdev=${dev%%:*}
dtype=$([ "$tdev" = cuda ] && echo float16 || echo float32)
read -r size big <<< "${KILN_CHECK_SIZES:-512 768}"
batches=${KILN_CHECK_BATCHES:-1,8}

if [ -n "${KILN_BIN:-}" ]; then
    kiln=$(realpath "$KILN_BIN")
else
    xz -dc "$carry/kiln.xz" > "$work/kiln" && chmod +x "$work/kiln"
    kiln="$work/kiln"
fi
[ -d "$carry" ] && pip install -q --no-deps "$carry"/*.whl 2>&1 | tail -1
python3 -c 'import torch, transformers, diffusers, safetensors; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)' \
    | tee "$OUT/versions.txt" || log "a Python package is missing: carry its wheel in $carry"
# The CUDA libraries of PyTorch's environment (cuBLAS, cuRAND, NVRTC of CUDA 13).
if [ "$tdev" = cuda ]; then
    nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
    export LD_LIBRARY_PATH="$(find "$nv" -name 'lib' -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
fi

log "devices"
"$kiln" devices | tee "$OUT/devices.txt"
[ "$tdev" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv >> "$OUT/devices.txt"

if [ -n "${KILN_CHECK_MODEL:-}" ]; then
    model=$(realpath "$KILN_CHECK_MODEL")
else
    model="$work/sd15"
    log "making the random full-size SD1.5 model"
    python3 tools/bench/make_sd15_random.py "$model" > /dev/null
fi

bench() { # SIZE CFG BATCHES
    "$kiln" bench --model "$model" --device "$dev" --size "$1" --cfg "$2" --batch "$3" --json \
        >> "$OUT/speed.jsonl" 2>> "$OUT/log.txt" || log "kiln bench $* failed"
    python3 tools/gpu/bench_diffusers.py "$model" --device "$tdev" --dtype "$dtype" --size "$1" \
        --cfg "$2" --batch "$3" >> "$OUT/speed.jsonl" 2>> "$OUT/log.txt" || log "diffusers bench $* failed"
}
log "speed $size cfg 1 (round 1)"; bench "$size" 1 "$batches"
log "speed $size cfg 1 (round 2)"; bench "$size" 1 "$batches"
log "speed $size cfg 1.5"; bench "$size" 1.5 "$batches"
log "speed $big cfg 1"; bench "$big" 1 1

log "parity"
for seed in 1 2; do
    for d in "$dev" cpu; do
        "$kiln" render --model "$model" --prompt "a photograph of an astronaut riding a horse" \
            --seed $seed --steps 4 --cfg 1 --width "$size" --height "$size" --device "$d" \
            -o "$OUT/kiln-${d%%:*}-$seed.png" 2>> "$OUT/log.txt"
    done
    python3 tools/gpu/bench_diffusers.py "$model" --device "$tdev" --dtype "$dtype" --size "$size" \
        --render $seed -o "$OUT/diffusers-$seed.png" 2>> "$OUT/log.txt"
done
python3 tools/gpu/compare_png.py \
    "$OUT/kiln-$tdev-1.png" "$OUT/diffusers-1.png" "$OUT/kiln-$tdev-2.png" "$OUT/diffusers-2.png" \
    "$OUT/kiln-$tdev-1.png" "$OUT/kiln-cpu-1.png" "$OUT/kiln-cpu-1.png" "$OUT/diffusers-1.png" \
    | tee "$OUT/parity.jsonl"

log "farm"
cat > "$work/farm.toml" <<EOF
name = "gpu-farm"
model = "$model"
prompt = "a photograph of an astronaut riding a horse"
sampler = "lcm"
steps = 4
cfg = 1.0
width = $size
height = $size
seeds = { from = 1, count = 32 }
EOF
(
    cd "$work" && start=$(date +%s.%N) &&
        "$kiln" run farm.toml --device "$dev" --db sqlite://farm.db --storage "file://$work/farm-out" \
            2>> "$OUT/log.txt" &&
        python3 -c "import sys, time; print('{\"farm_cells\": 32, \"farm_wall_s\": %.2f}' % (time.time() - float(sys.argv[1])))" "$start"
) | tee "$OUT/farm.json"
"$kiln" bench --model "$model" --device "$dev" --size "$size" --batch 1 --reps 8 --json | tee -a "$OUT/farm.json"

[ "$tdev" = cuda ] || { log "done (no oom part off the GPU)"; exit 0; }
log "oom"
# Leave about 3 GiB free: the model fits, a 2048² cell does not, a 256² one does.
python3 - <<'EOF' &
import time, torch
free, _ = torch.cuda.mem_get_info()
hog = torch.empty(max(0, free - (3 << 30)), dtype=torch.uint8, device="cuda")
open("/tmp/kiln-hog-ready", "w").close()
time.sleep(600)
EOF
hog=$!
for _ in $(seq 120); do [ -e /tmp/kiln-hog-ready ] && break; sleep 1; done
cat > "$work/oom.toml" <<EOF
name = "gpu-oom"
model = "$model"
prompt = "a photograph of an astronaut riding a horse"
sampler = "lcm"
steps = 4
cfg = 1.0
seeds = [1]
[axes]
size = ["2048x2048", "256x256"]
EOF
(cd "$work" && "$kiln" run oom.toml --device cuda:0 --db sqlite://oom.db --storage "file://$work/oom-out" \
    > "$OUT/oom.txt" 2>&1; echo "exit $?" >> "$OUT/oom.txt")
kill $hog
find "$work/oom-out" -name '*.png' | tee -a "$OUT/oom.txt"
log "done"
