#!/usr/bin/env bash
# Load test of `kiln serve` with the quick start's small CNN, with and without dynamic
# batching, on loopback. Usage: bench/serve_load.sh [CONNECTIONS=64] [SECONDS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-64}
seconds=${2:-10}
cargo build --release --quiet --bin kiln --example load_test
kiln=target/release/kiln
$kiln run pipelines/quickstart.toml --no-progress >/dev/null
image=$(ls outputs/quickstart/eval/mistakes/*.png | head -1)
for batch in 1 32; do
  $kiln serve pipelines/quickstart.toml:train --addr 127.0.0.1:0 --max-batch "$batch" > /tmp/kiln-serve.out 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q listening /tmp/kiln-serve.out 2>/dev/null && break; sleep 0.1; done
  url=$(awk '/listening/ {print $3}' /tmp/kiln-serve.out)
  echo "--max-batch $batch:"
  target/release/examples/load_test "$url" "$image" "$connections" "$seconds" || true
  echo "  batch sizes: $(curl -s "$url/metrics" 2>/dev/null | awk '/^kiln_batch_size_(sum|count)/ {print $1"="$2}' | tr '\n' ' ')"
  kill -TERM "$pid"; wait "$pid"
done
