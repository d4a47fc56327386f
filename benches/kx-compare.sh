#!/usr/bin/env bash
# Full mutual-TLS handshakes per second against a keyproof inbound with the
# client offering X25519MLKEM768 only vs X25519 only, alternating rounds in one
# run, plus each group's ClientHello size (handshake_load --group).
# usage: benches/kx-compare.sh   env: ROUNDS (3), SECONDS_PER (4), CONC (32)
# Builds the release binaries; needs only the Rust toolchain. Everything runs
# on loopback in a temp dir that is removed at exit.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
rounds=${ROUNDS:-3}; secs=${SECONDS_PER:-4}; conc=${CONC:-32}
(cd "$repo" && cargo build --release --locked -q -p keyproof-proxy -p keyproof-ca -p keyproof-benches \
  --bin keyproof-proxy --bin keyproof-ca --bin handshake_load)
bin=$repo/target/release
work=$(mktemp -d)
proxy=
trap '[ -n "$proxy" ] && kill "$proxy" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$bin/keyproof-ca" init --dir "$work/ca" --trust-domain kx.bench >/dev/null
for who in server client; do
  "$bin/keyproof-ca" issue --dir "$work/ca" --spiffe-id "spiffe://kx.bench/ns/bench/sa/$who" \
    --key-out "$work/$who.key" --cert-out "$work/$who.crt" --dns localhost >/dev/null
done
port=$(free_port); admin=$(free_port); app=$(free_port)
cat > "$work/in.toml" <<TOML
[identity]
trust_bundle = "$work/ca/bundle.pem"
[identity.files]
cert = "$work/server.crt"
key = "$work/server.key"
[inbound]
listen = "127.0.0.1:$port"
app = "127.0.0.1:$app"
[admin]
listen = "127.0.0.1:$admin"
TOML
RUST_LOG=warn "$bin/keyproof-proxy" run --config "$work/in.toml" > "$work/in.log" 2>&1 &
proxy=$!
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.05; done
"$bin/handshake_load" --target "127.0.0.1:$port" --cert "$work/client.crt" --key "$work/client.key" \
  --ca "$work/ca/bundle.pem" --concurrency "$conc" --seconds "$secs" --rounds "$rounds" \
  --group x25519mlkem768 --group x25519
curl -s "http://127.0.0.1:$admin/metrics" | grep '^keyproof_tls_key_exchange_total{direction="inbound"'
