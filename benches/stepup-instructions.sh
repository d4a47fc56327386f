#!/usr/bin/env bash
# User-space instructions per request of one sidecar on the step-up hop of
# stepup-mesh.sh (/su with `step_up = true`, /plain without), counted by
# valgrind's callgrind: repeatable whatever else the machine does, so it
# shows what a change to the step-up path saves where wall-clock CPU figures
# drown in noise. Same caveats as instructions.sh (no kernel share; no
# AVX-512, SHA or ADX extensions under valgrind, so SHA-256 and the curve
# arithmetic run other code paths than on the real CPU).
# usage: benches/stepup-instructions.sh in|out [BINARY]   (default: the `cargo build-proxy` binary)
#        env: ROUTES ("plain su"), CONNS (8), SECONDS_EACH (5). Needs valgrind, wrk, nginx, openssl.
#        Prints one line per route; the callgrind profiles stay in the printed directory.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
side=${1:?in or out}
bin=${2:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
routes=${ROUTES:-plain su} conns=${CONNS:-8} secs=${SECONDS_EACH:-5}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
            [ -f "$work/backend.pid" ] && kill "$(cat "$work/backend.pid")" 2>/dev/null || true; }
trap cleanup EXIT
"$repo/../shared/bench/gen-certs.sh" "$work/certs" >/dev/null
c=$work/certs
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
cat > "$work/backend.conf" <<C
worker_processes 1; pid $work/backend.pid; error_log $work/backend.err; daemon on;
events { worker_connections 8192; }
http { access_log off; server { listen 127.0.0.1:18080 backlog=4096; keepalive_requests 100000000;
  location / { return 200 "hello from backend\n"; } } }
C
nginx -c "$work/backend.conf" -e "$work/backend.err"; wait_port 18080
client=spiffe://bench.local/ns/default/sa/client
cat > "$work/in.toml" <<C
[identity]
trust_bundle = "$c/ca.crt"
[identity.files]
cert = "$c/server.crt"
key = "$c/server.key"
[inbound]
listen = "127.0.0.1:15443"
app = "127.0.0.1:18080"
[[inbound.routes]]
path_prefix = "/su"
allow = ["$client"]
step_up = true
[[inbound.routes]]
path_prefix = "/plain"
allow = ["$client"]
[admin]
listen = "127.0.0.1:15092"
[runtime]
worker_threads = 1
C
cat > "$work/out.toml" <<C
[identity]
trust_bundle = "$c/ca.crt"
[identity.files]
cert = "$c/client.crt"
key = "$c/client.key"
[outbound]
listen = "127.0.0.1:15001"
[[outbound.upstreams]]
host = "*"
address = "127.0.0.1:15443"
identity = "spiffe://bench.local/ns/default/sa/server"
[admin]
listen = "127.0.0.1:15091"
[runtime]
worker_threads = 1
C
# The measured side runs under valgrind, instrumenting nothing until asked.
start() {
  if [ "$1" = "$side" ]; then
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
      "$bin" run --config "$work/$1.toml" > "$work/valgrind.log" 2>&1 & pids+=($!); vg=$!
  else
    RUST_LOG=warn "$bin" run --config "$work/$1.toml" > "$work/$1.log" 2>&1 & pids+=($!)
  fi
  wait_port "$2"
}
start in 15443; start out 15001
for route in $routes; do
  curl -sf -o /dev/null "http://127.0.0.1:15001/$route" || { echo "/$route through the hop failed; logs in $work" >&2; exit 1; }
  wrk -t1 -c"$conns" -d3s "http://127.0.0.1:15001/$route" >/dev/null
  callgrind_control -z "$vg" >/dev/null 2>&1
  callgrind_control -i on "$vg" >/dev/null 2>&1
  out=$(wrk -t1 -c"$conns" -d"${secs}s" "http://127.0.0.1:15001/$route")
  callgrind_control -i off "$vg" >/dev/null 2>&1
  callgrind_control -d "$vg" >/dev/null 2>&1
  sleep 1
  reqs=$(awk '/requests in/{print $1}' <<<"$out")
  ir=$(ls -t "$work"/cg.out.* | head -1 | xargs cat | awk '/^totals:/{s+=$2} END{print s+0}')
  echo "$(basename "$bin") $side /$route: $reqs requests, $((ir / reqs)) instructions per request"
done
echo "profiles: $work (one cg.out.N per route, in order)"
trap - EXIT; cleanup
