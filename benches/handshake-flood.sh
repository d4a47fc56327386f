#!/usr/bin/env bash
# The inbound's RSS under a handshake flood: COUNT connections (RATE a
# second) that each send a TLS 1.3 ClientHello and then nothing, held for
# 5 s (benches/handshake-flood.py). Prints the RSS before, the peak during
# the flood, the peak of keyproof_connections_open and the handshakes shed.
# usage: benches/handshake-flood.sh [BINARY]   (default target/debug/keyproof-proxy)
#        env: COUNT (5000), RATE (2000), EXTRA (more [inbound] keys, e.g.
#        'max_handshakes = 64'), CA (keyproof-ca binary, default target/debug)
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
bin=${1:-$repo/target/debug/keyproof-proxy}
ca=${CA:-$repo/target/debug/keyproof-ca}
count=${COUNT:-5000}; rate=${RATE:-2000}
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$ca" init --dir "$work/ca" --trust-domain flood.test >/dev/null
"$ca" issue --dir "$work/ca" --spiffe-id spiffe://flood.test/ns/default/sa/api \
  --key-out "$work/s.key" --cert-out "$work/s.crt" --dns localhost >/dev/null
"$ca" bundle --dir "$work/ca" > "$work/bundle.pem"
port=$(free); admin=$(free)
cat > "$work/in.toml" <<TOML
[identity]
trust_bundle = "$work/bundle.pem"
[identity.files]
cert = "$work/s.crt"
key = "$work/s.key"
[inbound]
listen = "127.0.0.1:$port"
app = "127.0.0.1:9"
${EXTRA:-}
[admin]
listen = "127.0.0.1:$admin"
TOML
RUST_LOG=error "$bin" run --config "$work/in.toml" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/{print $2}' "/proc/$pid/status"; }
metric() { curl -s "127.0.0.1:$admin/metrics" | awk -v m="$1" 'index($0, m" ")==1{print $2}'; }
sleep 1
before=$(rss)
python3 "$here/handshake-flood.py" "127.0.0.1:$port" "$count" "$rate" 5 > "$work/flood.out" &
flood=$!
peak=$before; open_peak=0
while kill -0 "$flood" 2>/dev/null; do
  r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
  o=$(metric 'keyproof_connections_open{direction="inbound"}'); o=${o:-0}
  [ "$o" -gt "$open_peak" ] && open_peak=$o
  sleep 0.2
done
cat "$work/flood.out"
echo "inbound RSS ${before} KiB before, peak ${peak} KiB during the flood;" \
     "peak connections open ${open_peak};" \
     "handshakes shed $(metric 'keyproof_tls_handshakes_shed_total{direction="inbound"}')"
