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
# Not yet run on a GPU by anyone: expect to fix what the first run shows.
set -uo pipefail
carry=${1:?usage: check.sh CARRY_DIR}
OUT=${OUT:-/tmp/kiln-gpu-out}
mkdir -p "$OUT"
work=$(mktemp -d)
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }

xz -dc "$carry/kiln.xz" > "$work/kiln" && chmod +x "$work/kiln"
kiln="$work/kiln"
pip install -q --no-deps "$carry"/diffusers-*.whl 2>&1 | tail -1
# The CUDA libraries of PyTorch's environment (cuBLAS, cuRAND, NVRTC of CUDA 13).
nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
export LD_LIBRARY_PATH="$(find "$nv" -name 'lib' -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"

log "devices"
"$kiln" devices | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv >> "$OUT/devices.txt"

model="$work/sd15"
log "making the random full-size SD1.5 model"
python3 tools/bench/make_sd15_random.py "$model" > /dev/null

bench() { # SIZE CFG BATCHES
    "$kiln" bench --model "$model" --device cuda:0 --size "$1" --cfg "$2" --batch "$3" --json \
        >> "$OUT/speed.jsonl" 2>> "$OUT/log.txt" || log "kiln bench $* failed"
    python3 tools/gpu/bench_diffusers.py "$model" --device cuda --size "$1" --cfg "$2" --batch "$3" \
        >> "$OUT/speed.jsonl" 2>> "$OUT/log.txt" || log "diffusers bench $* failed"
}
log "speed 512 cfg 1 (round 1)"; bench 512 1 1,8
log "speed 512 cfg 1 (round 2)"; bench 512 1 1,8
log "speed 512 cfg 1.5"; bench 512 1.5 1,8
log "speed 768 cfg 1"; bench 768 1 1

log "parity"
for seed in 1 2; do
    for dev in cuda:0 cpu; do
        "$kiln" render --model "$model" --prompt "a photograph of an astronaut riding a horse" \
            --seed $seed --steps 4 --cfg 1 --device $dev -o "$OUT/kiln-${dev%%:*}-$seed.png" 2>> "$OUT/log.txt"
    done
    python3 tools/gpu/bench_diffusers.py "$model" --device cuda --render $seed -o "$OUT/diffusers-$seed.png" 2>> "$OUT/log.txt"
done
python3 tools/gpu/compare_png.py \
    "$OUT/kiln-cuda-1.png" "$OUT/diffusers-1.png" "$OUT/kiln-cuda-2.png" "$OUT/diffusers-2.png" \
    "$OUT/kiln-cuda-1.png" "$OUT/kiln-cpu-1.png" "$OUT/kiln-cpu-1.png" "$OUT/diffusers-1.png" \
    | tee "$OUT/parity.jsonl"

log "farm"
cat > "$work/farm.toml" <<EOF
name = "gpu-farm"
model = "$model"
prompt = "a photograph of an astronaut riding a horse"
sampler = "lcm"
steps = 4
cfg = 1.0
width = 512
height = 512
seeds = { from = 1, count = 32 }
EOF
(
    cd "$work" && start=$(date +%s.%N) &&
        "$kiln" run farm.toml --device cuda:0 --db sqlite://farm.db --storage "file://$work/farm-out" \
            2>> "$OUT/log.txt" &&
        echo "{\"farm_cells\": 32, \"farm_wall_s\": $(echo "$(date +%s.%N) - $start" | bc)}"
) | tee "$OUT/farm.json"
"$kiln" bench --model "$model" --device cuda:0 --batch 1 --reps 8 --json | tee -a "$OUT/farm.json"

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
