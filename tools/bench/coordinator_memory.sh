#!/usr/bin/env bash
# Peak memory of `kiln coordinator` while it plans and takes in sweeps of 1,000,000 cells (issue 14:
# growth under 256 MiB for one request, under 512 MiB for four at once). Each case starts a fresh
# coordinator on a fresh SQLite file, reads its VmRSS when idle, runs the clients, then reads
# VmHWM (the peak resident set since start): growth = VmHWM - idle VmRSS. Linux only.
#
#   tools/bench/coordinator_memory.sh            # uses target/debug/kiln (cargo build -p kiln-cli)
#   KILN_BIN=/path/to/kiln tools/bench/coordinator_memory.sh
set -euo pipefail
kiln=${KILN_BIN:-target/debug/kiln}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
alt='{a|b|c|d|e|f|g|h|i|j}'
cat > "$dir/million.toml" <<TOML
name = "million"
model = "tiny-sd15"
prompt = "a fox, $alt $alt $alt $alt $alt $alt"
steps = 4
width = 512
height = 512
seeds = [1]
TOML

kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$2/status"; }

# case LABEL N COMMAND: N clients at once, each `kiln COMMAND`.
case_() {
    local label=$1 n=$2 cmd=$3 db="$dir/kiln-$RANDOM.db" addr="$dir/addr-$RANDOM"
    KILN_LOG=warn "$kiln" coordinator --listen 127.0.0.1:0 --db "sqlite://$db" --addr-file "$addr" &
    local pid=$!
    until [ -s "$addr" ]; do sleep 0.1; done
    sleep 1
    local idle; idle=$(kb VmRSS $pid)
    local t0; t0=$(date +%s.%N)
    local pids=()
    for i in $(seq "$n"); do
        if [ "$cmd" = plan ]; then
            "$kiln" plan "$dir/million.toml" --show 3 --remote --coordinator "http://$(cat "$addr")" > /dev/null &
        else
            "$kiln" submit "$dir/million.toml" --key "k$i" --coordinator "http://$(cat "$addr")" > /dev/null &
        fi
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    local t1; t1=$(date +%s.%N)
    local peak; peak=$(kb VmHWM $pid)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    printf '%-22s idle %4d MiB  peak %5d MiB  growth %5d MiB  %5.1f s\n' "$label" \
        $((idle / 1024)) $((peak / 1024)) $(((peak - idle) / 1024)) "$(echo "$t1 - $t0" | bc)"
}

case_ "PlanSweep x1" 1 plan
case_ "SubmitSweep x1" 1 submit
case_ "PlanSweep x4" 4 plan
case_ "SubmitSweep x4" 4 submit
