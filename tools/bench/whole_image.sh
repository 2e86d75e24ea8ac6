#!/usr/bin/env bash
# One whole image as a user sees it, kiln against diffusers, alternated: per round, `kiln render`
# of an LCM 4-step CFG 1 image at SIZE² and the same with diffusers (diffusers_image.py), each a
# fresh process on the same weights (a diffusers folder, e.g. the random full-size SD1.5 of
# make_sd15_random.py) with THREADS threads; then the same at 64² with 1 step, which is mostly
# loading. Prints each run's wall seconds and peak RSS, each side's own account of its time
# (kiln render's last line; diffusers_image.py's JSON), and the medians, loading included.
#
#   tools/bench/whole_image.sh [DIR] [ROUNDS] [SIZE] [THREADS] [PY] [KILN]
#
# Defaults: /tmp/kiln-bench/sd15-random, 2 rounds, 512, 2 threads, /work/venv/bin/python,
# target/release/kiln (cargo build --release -p kiln-cli).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-/tmp/kiln-bench/sd15-random}
rounds=${2:-2}
size=${3:-512}
threads=${4:-2}
py=${5:-/work/venv/bin/python}
kiln=${6:-target/release/kiln}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); kiln: $kiln"

# wall seconds and peak RSS (GB) of a command, as "S GB".
timed() {
    /usr/bin/time -f "%e %M" -o "$out/time" "$@" >"$out/stdout" 2>"$out/stderr" || {
        cat "$out/stderr" >&2
        return 1
    }
    awk '{printf "%s %.2f", $1, $2 / 1048576}' "$out/time"
}
kiln_image() {
    timed "$kiln" --threads "$threads" render --model "$dir" --prompt "a photograph of an astronaut riding a horse" \
        --seed 1 --steps "$1" --sampler lcm --cfg 1 --width "$2" --height "$2" -o "$out/kiln.png"
}
torch_image() {
    timed "$py" tools/bench/diffusers_image.py "$dir" --size "$2" --steps "$1" --threads "$threads"
}
for r in $(seq "$rounds"); do
    echo "round $r (load $(cut -d' ' -f1-3 /proc/loadavg)):"
    t=$(kiln_image 4 "$size")
    echo "  kiln  ${size}² 4 steps: $t s GB $(grep -ao 'in [0-9.]* s: .*' "$out/stderr")"
    t=$(torch_image 4 "$size")
    echo "  torch ${size}² 4 steps: $t s GB $(cat "$out/stdout")"
    t=$(kiln_image 1 64)
    echo "  kiln  64² 1 step: $t s GB $(grep -ao 'in [0-9.]* s: .*' "$out/stderr")"
    t=$(torch_image 1 64)
    echo "  torch 64² 1 step: $t s GB $(cat "$out/stdout")"
done | tee "$out/rounds"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$out/rounds" "$size" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s+(kiln|torch)\s+(\S+) (\d+) steps?: ([\d.]+) ([\d.]+)", line)
    if m:
        rows.setdefault((m[1], m[2]), []).append((float(m[4]), float(m[5])))
loads = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s+(kiln|torch)\s+(\S+) (\d+) steps?: ([\d.]+) ([\d.]+)", line)
    load = re.search(r'(?:"load_s": |loading )([\d.]+)', line)
    if m and load:
        loads.setdefault((m[1], m[2]), []).append(float(load[1]))
for (who, size), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    before = loads.get((who, size))
    before = f", loading (before the first step) {statistics.median(before):.2f} s" if before else ""
    print(f"median {who:5} {size}: {statistics.median(r[0] for r in runs):.1f} s, "
          f"peak {max(r[1] for r in runs):.2f} GB ({len(runs)} runs){before}")
PY
