#!/usr/bin/env bash
# Step-up steady state through one mesh hop, the same route with and without
# step-up, in interleaved rounds:
#   wrk -> OUT sidecar (127.0.0.1:15001) -> mutual TLS 1.3 -> IN sidecar (127.0.0.1:15443) -> nginx (127.0.0.1:18080)
# /su has `step_up = true`, /plain is the same route without it. Prints the
# median req/s and p50/p99 per route, the ratios, and the round trips: the
# requests that reached the inbound per wrk request (1.00 = no extra trip).
# usage: benches/stepup-mesh.sh    env: ROUNDS (3), SECONDS_EACH (8), CONNS (32), ROUTES ("plain su"),
#        KEYPROOF_PROXY (target/x86_64-unknown-linux-gnu/release/keyproof-proxy, from `cargo build-proxy`). Needs wrk, nginx, openssl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
keyproof=${KEYPROOF_PROXY:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
rounds=${ROUNDS:-3} secs=${SECONDS_EACH:-8} conns=${CONNS:-32} routes=${ROUTES:-plain su}
"$repo/proxy/layout/check.sh" "$keyproof" || true
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
            [ -f "$work/backend.pid" ] && kill "$(cat "$work/backend.pid")" 2>/dev/null || true; }
trap cleanup EXIT
"$repo/../shared/bench/gen-certs.sh" "$work/certs" >/dev/null
c=$work/certs
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
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
RUST_LOG=warn "$keyproof" run --config "$work/in.toml" > "$work/in.log" 2>&1 & pids+=($!)
RUST_LOG=warn "$keyproof" run --config "$work/out.toml" > "$work/out.log" 2>&1 & pids+=($!)
wait_port 15443; wait_port 15001
inbound_requests() { curl -s http://127.0.0.1:15092/metrics | awk '/^keyproof_requests_total\{.*direction="inbound"/{s+=$2} END{print s+0}'; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
to_us() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) print v+0; else if (v ~ /ms$/) print v*1000; else if (v ~ /s$/) print v*1000000; else print v }'; }
for route in $routes; do
  curl -sf -o /dev/null "http://127.0.0.1:15001/$route" || { echo "/$route through the hop failed; logs in $work" >&2; exit 1; }
  wrk -t1 -c"$conns" -d1s "http://127.0.0.1:15001/$route" >/dev/null   # warm-up: connection, kept nonces
done
echo "round route rps p50_us p99_us trips errors in_cpu_us out_cpu_us" > "$work/rows"
for r in $(seq "$rounds"); do
  for route in $routes; do
    before=$(inbound_requests); ci0=$(cpu "${pids[0]}"); co0=$(cpu "${pids[1]}")
    out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:15001/$route")
    after=$(inbound_requests); ci1=$(cpu "${pids[0]}"); co1=$(cpu "${pids[1]}")
    reqs=$(awk '/requests in/{print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
    p50=$(to_us "$(awk '$1=="50%"{print $2}' <<<"$out")"); p99=$(to_us "$(awk '$1=="99%"{print $2}' <<<"$out")")
    errs=$( (grep -E 'Non-2xx|Socket errors' <<<"$out" || true) | grep -oE '[0-9]+' | paste -sd+ | bc 2>/dev/null || true)
    trips=$(echo "scale=4; ($after-$before)/$reqs" | bc)
    in_cpu=$(echo "scale=1; ($ci1-$ci0)*1000000/$tck/$reqs" | bc); out_cpu=$(echo "scale=1; ($co1-$co0)*1000000/$tck/$reqs" | bc)
    echo "$r $route $rps $p50 $p99 $trips ${errs:-0} $in_cpu $out_cpu" >> "$work/rows"
  done
done
curl -s http://127.0.0.1:15092/metrics | grep -E '^keyproof_stepup_(verifications_total\{result="(ok|missing|replay|bad_nonce|expired)"|challenges_total|nonce_table_full_total|nonces_outstanding)' || true
python3 - "$work/rows" <<'PY'
import sys, statistics as st
rows=[l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
med=lambda p,i: st.median(float(r[i]) for r in rows if r[1]==p)
print(f"{'route':6} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'trips/req':>9} {'errors':>6} {'in cpu us/req':>13} {'out cpu us/req':>14}")
for p in dict.fromkeys(r[1] for r in rows):
    print(f"{p:6} {med(p,2):9.0f} {med(p,3):8.0f} {med(p,4):8.0f} {med(p,5):9.3f} {med(p,6):6.0f} {med(p,7):13.1f} {med(p,8):14.1f}")
if {'plain','su'} - {r[1] for r in rows}: sys.exit(0)
def ratio(i):
    return st.median(float(a[i])/float(b[i]) for a in rows if a[1]=='su' for b in rows if b[1]=='plain' and b[0]==a[0])
print(f"step-up / plain: throughput x{ratio(2):.2f}  p50 x{ratio(3):.2f}  p99 x{ratio(4):.2f}")
PY
