#!/usr/bin/env bash
# Model download throughput: `kiln model pull` (what a worker does for a model it lacks:
# ranged GET streamed to a .part file, sha256 on the way, flushed, renamed) against `aws s3 cp`
# of the same object (the AWS CLI from PyPI: `pip install awscli`), from the S3 test server
# s3s-fs on loopback. Rounds alternate the two sides; medians and their ratio are printed.
#
#   tools/bench/model_fetch.sh [SIZE_MIB] [ROUNDS] [AWS]
#
# SIZE_MIB (default 1024) is the random file's size, ROUNDS (default 3) the rounds per side,
# AWS the aws command (default /work/venv-aws/bin/aws, else aws on PATH). Uses target/debug/kiln
# (build it with cargo build -p kiln-cli) and target/tools/bin/s3s-fs (tools/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
size=${1:-1024}
rounds=${2:-3}
aws=${3:-/work/venv-aws/bin/aws}
[ -x "$aws" ] || aws=aws
kiln="$PWD/target/debug/kiln"
s3s="$PWD/target/tools/bin/s3s-fs"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

export AWS_ACCESS_KEY_ID=kilnbench AWS_SECRET_ACCESS_KEY=kilnbenchsecret AWS_DEFAULT_REGION=us-east-1
export KILN_S3_ACCESS_KEY=$AWS_ACCESS_KEY_ID KILN_S3_SECRET_KEY=$AWS_SECRET_ACCESS_KEY KILN_LOG=warn
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/s3"
"$s3s" --host 127.0.0.1 --port "$port" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" >/dev/null 2>&1 &
endpoint="http://127.0.0.1:$port"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
"$aws" --endpoint-url "$endpoint" s3 mb s3://bench >/dev/null

"$kiln" coordinator --listen 127.0.0.1:0 --addr-file "$work/addr" --db "sqlite://$work/kiln.db" \
    --model-storage s3://bench/pool >/dev/null 2>&1 &
for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.1; done
export KILN_COORDINATOR="http://$(cat "$work/addr")"

head -c $((size << 20)) /dev/urandom > "$work/big.safetensors"
"$kiln" model add "$work/big.safetensors" --name big --s3-endpoint "$endpoint" --s3-path-style >/dev/null
hex=$(sha256sum "$work/big.safetensors" | cut -d' ' -f1)
rm "$work/big.safetensors"
echo "machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); file: $size MiB"

secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$@"; }
for r in $(seq "$rounds"); do
    sync
    t0=$(date +%s.%N)
    "$aws" --endpoint-url "$endpoint" s3 cp "s3://bench/pool/models/sha256/$hex" "$work/aws.bin" \
        --only-show-errors
    t1=$(date +%s.%N)
    rm -f "$work/aws.bin"
    sync
    t2=$(date +%s.%N)
    "$kiln" model pull big --model-cache "$work/cache-$r" --s3-endpoint "$endpoint" \
        --s3-path-style >/dev/null
    t3=$(date +%s.%N)
    rm -rf "$work/cache-$r"
    echo "round $r: aws $(secs "$t0" "$t1") s, kiln $(secs "$t2" "$t3") s"
done | tee "$work/rounds"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$size" "$work/rounds" <<'EOF'
import statistics, sys
size = int(sys.argv[1]) * (1 << 20) / 1e6
aws, kiln = [], []
for line in open(sys.argv[2]):
    parts = line.split()
    aws.append(float(parts[3])); kiln.append(float(parts[6]))
a, k = statistics.median(aws), statistics.median(kiln)
print(f"median: aws s3 cp {size / a:.0f} MB/s, kiln model pull {size / k:.0f} MB/s, "
      f"ratio kiln/aws {a / k:.2f} (goal >= 0.8)")
EOF
