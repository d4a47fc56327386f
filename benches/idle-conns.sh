#!/usr/bin/env bash
# Memory per idle mutual-TLS connection on a keyproof inbound: the inbound's
# RSS before and while `handshake_load --hold` keeps CONNS connections open
# and silent (each with a completed full handshake and client certificate).
# usage: benches/idle-conns.sh [BINARY]   (default target/x86_64-unknown-linux-gnu/release/
#        keyproof-proxy, from `cargo build-proxy`)   env: CONNS (10000). Needs nginx, openssl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
bench=$repo/../shared/bench
bin=${1:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
conns=${CONNS:-10000}
work=$(mktemp -d)
trap '"$bench/sidecars.sh" stop keyproof "$work/certs" "$work/run" >/dev/null 2>&1 || true
      "$bench/sidecars.sh" stop backend "$work/certs" "$work/run" >/dev/null 2>&1 || true' EXIT
(cd "$repo" && cargo build --release --locked -q -p keyproof-benches --bin handshake_load)
ulimit -n $((conns + 1024))
"$bench/gen-certs.sh" "$work/certs" >/dev/null
"$bench/sidecars.sh" start backend "$work/certs" "$work/run" >/dev/null
KEYPROOF_PROXY=$bin "$bench/sidecars.sh" start keyproof "$work/certs" "$work/run" >/dev/null
pid=$(cat "$work/run/keyproof-in.pid")
rss() { awk '/VmRSS/{print $2}' "/proc/$pid/status"; }
open() { curl -s localhost:15092/metrics | awk '/^keyproof_connections_open\{direction="inbound"\}/{print $2}'; }
# Warm: one request through the pair, so the start-up allocations are in.
curl -s -o /dev/null http://127.0.0.1:15001/
before=$(rss); open_before=$(open)
"$repo/target/release/handshake_load" --target 127.0.0.1:15443 --cert "$work/certs/client.crt" \
  --key "$work/certs/client.key" --ca "$work/certs/ca.crt" --concurrency 64 --seconds 6 \
  --hold "$conns" > "$work/hold.out" 2>&1 &
load=$!
for _ in $(seq 600); do grep -q holding "$work/hold.out" && break; sleep 0.1; done
sleep 1
after=$(rss); held=$(( $(open) - open_before ))
cat "$work/hold.out"
echo "inbound RSS ${before} KiB before, ${after} KiB with ${held} more connections open:" \
     "$(echo "scale=1; ($after - $before) / $held" | bc) KiB per connection"
wait "$load"
