#!/usr/bin/env bash
# The lease preference for workers that already hold a cell's model: two registered checkpoints
# (the tiny single-file model and a copy with one bit of one weight changed, so a different
# sha256), a sweep of CELLS cells alternating between them, two workers with empty model caches
# on the loopback S3 test server. Prints how many downloads each worker made and the fraction
# of cells rendered without a download: the ideal is 2 downloads (each worker fetches one model
# and renders its cells), the worst 4 (each worker fetches both).
#
#   tools/bench/model_affinity.sh [CELLS] [AWS]
#
# CELLS (default 24, even), AWS the aws command used to create the bucket (default
# /work/venv-aws/bin/aws, else aws on PATH). Uses target/debug/kiln and target/tools/bin/s3s-fs.
set -euo pipefail
cd "$(dirname "$0")/../.."
cells=${1:-24}
aws=${2:-/work/venv-aws/bin/aws}
[ -x "$aws" ] || aws=aws
fixtures="$PWD/worker/tests/fixtures/reference"
# s3s-fs with bucket "bench" and a coordinator whose model storage is s3://bench/pool.
source tools/bench/s3_pool.sh

cp "$fixtures/tiny-ldm.safetensors" "$work/tiny-a.safetensors"
cp "$fixtures/tiny-ldm.safetensors" "$work/tiny-b.safetensors"
# The lowest bit of the last weight (little-endian f32: its first byte).
python3 - "$work/tiny-b.safetensors" <<'EOF'
import os, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(os.path.getsize(sys.argv[1]) - 4)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 1]))
EOF
for m in tiny-a tiny-b; do
    "$kiln" model add "$work/$m.safetensors" --name "$m" --s3-endpoint "$endpoint" --s3-path-style >/dev/null
done

seeds=$(python3 -c "print(', '.join(str(i) for i in range(1, $cells // 2 + 1)))")
cat > "$work/affinity.toml" <<EOF
name = "affinity"
prompt = "a photograph of an astronaut riding a horse"
size = "64x64"
steps = 2
seeds = [$seeds]
[axes]
model = ["tiny-a", "tiny-b"]
EOF
"$kiln" submit "$work/affinity.toml" >/dev/null
echo "machine: $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); cells: $cells"
for w in 1 2; do
    mkdir -p "$work/models-$w"
    "$kiln" worker --name "pc$w" --storage s3://bench/renders --model-storage s3://bench/pool \
        --s3-endpoint "$endpoint" --s3-path-style --idle-poll-ms 50 \
        --models "$work/models-$w" --model-cache "$work/cache-$w" >/dev/null 2>&1 &
done
"$kiln" watch affinity >/dev/null
d1=$(ls "$work/cache-1/blobs" 2>/dev/null | wc -l)
d2=$(ls "$work/cache-2/blobs" 2>/dev/null | wc -l)
done_cells=$("$kiln" query 'sweep = "affinity" and state = "completed"' --format json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$d1" "$d2" "$done_cells" "$cells" <<'EOF'
import sys
d1, d2, done, cells = map(int, sys.argv[1:])
print(f"completed {done}/{cells}; downloads: pc1 {d1}, pc2 {d2}; cells rendered without a "
      f"download: {1 - (d1 + d2) / cells:.1%} (ideal {1 - 2 / cells:.1%}, worst {1 - 4 / cells:.1%})")
EOF
