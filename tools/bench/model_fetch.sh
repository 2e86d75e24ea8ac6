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
# s3s-fs with bucket "bench" and a coordinator whose model storage is s3://bench/pool.
source tools/bench/s3_pool.sh

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
