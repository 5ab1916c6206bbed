#!/usr/bin/env bash
# The remote cache's hit path against a one-node Garage on loopback: run a pipeline with
# [cache.remote] (uploads everything), wipe the local cache, run again (downloads
# everything), and print the times and transfer rates.
#   bench/remote.sh [MANIFEST=pipelines/fashion_mnist.toml] [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=${1:-pipelines/fashion_mnist.toml}
shift || true
command -v garage >/dev/null || { echo "needs garage on PATH (cargo install garage --locked)"; exit 2; }
cargo build --release --quiet --bin kiln
kiln=$PWD/target/release/kiln

work=$(mktemp -d)
trap 'kill $garage_pid 2>/dev/null || true; rm -rf "$work"' EXIT
rpc=$((20000 + RANDOM % 10000)); s3=$((rpc + 1))
cat > "$work/garage.toml" <<CONF
metadata_dir = "$work/meta"
data_dir = "$work/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
CONF
g() { garage -c "$work/garage.toml" "$@"; }
garage -c "$work/garage.toml" server > "$work/garage.log" 2>&1 &
garage_pid=$!
for _ in $(seq 100); do node=$(g node id -q 2>/dev/null) && break; sleep 0.2; done
g layout assign -z dc1 -c 10G "${node%@*}" >/dev/null
g layout apply --version 1 >/dev/null
until g bucket create bench >/dev/null 2>&1; do sleep 0.3; done
key=$(g key create bench-key)
export AWS_ACCESS_KEY_ID=$(awk -F': *' '/Key ID/ {print $2}' <<<"$key")
export AWS_SECRET_ACCESS_KEY=$(awk -F': *' '/Secret key/ {print $2}' <<<"$key")
g bucket allow --read --write --owner bench --key bench-key >/dev/null

# The pipeline as shipped, with its cache and the remote moved aside by --set (such runs
# leave the lock file alone), so the repository's own cache is untouched.
sets=(--set "pipeline.cache=\"$work/cache\"" --set 'cache.remote.url="s3://bench/kiln"'
      --set "cache.remote.endpoint=\"http://127.0.0.1:$s3\"" --set 'cache.remote.region="garage"' "$@")
run() { /usr/bin/time -f "wall %e s" "$kiln" run "$manifest" --no-progress "${sets[@]}" 2>&1 | grep -E "remote:|^wall|stages:"; }
echo "== cold: computed, uploaded to Garage"
run
rm -rf "$work/cache"
echo "== local cache wiped: every stage from Garage"
run
