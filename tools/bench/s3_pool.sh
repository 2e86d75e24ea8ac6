# Sourced by the model benchmarks (model_fetch.sh, model_affinity.sh), from the repository
# root with $aws set: starts the S3 test server s3s-fs (target/tools/bin/s3s-fs) with a bucket
# "bench" and a `kiln coordinator` (target/debug/kiln) whose model storage is s3://bench/pool,
# in a temporary folder removed on exit. Sets kiln, work, endpoint; exports the S3 credentials
# for both aws and kiln, and KILN_COORDINATOR.
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
