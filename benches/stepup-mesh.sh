#!/usr/bin/env bash
# Step-up steady state through one mesh hop, the same route with and without
# step-up, in interleaved rounds:
#   wrk -> OUT sidecar (127.0.0.1:15001) -> mutual TLS 1.3 -> IN sidecar (127.0.0.1:15443) -> nginx (127.0.0.1:18080)
# /su has `step_up = true`, /plain is the same route without it. Prints the
# median req/s and p50/p99 per route and connection count, the ratios, and the
# round trips: the requests that reached the inbound per wrk request (1.00 =
# no extra trip). Each round also measures the crypto floor of one step-up
# request with the workload key (stepup/examples/floor.rs: one signature and
# one verification, the calls the sidecars make, CPU time per operation) and
# the summary sets the step-up's extra CPU (both sidecars, su minus plain)
# and its p50 cost at one connection against it. With more than one
# connection, /plain also runs paced to the rate /su reached in the round
# ("plain@su": each connection waits 10 ms between requests, with as many
# connections as that rate needs): a sidecar that serves fewer requests per
# second batches less per wake-up and pays more per request, so su minus
# plain@su is the step-up's own cost, without that effect.
# Placements (PLACEMENTS, every round runs each): "shared", every process on
# any vCPU; "pods", the caller's pod (wrk, OUT) on cpu 0 and the callee's
# (IN, nginx) on cpu 1, as two pods on two nodes (taskset).
# usage: benches/stepup-mesh.sh
#   env: ROUNDS (3), SECONDS_EACH (8), CONNS ("32 1": each count in every round), ROUTES ("plain su"), PACED (1: plain@su runs),
#        KEY (p256 | ed25519: the workload keys of both sidecars), PLACEMENTS ("shared pods"; "pods" needs 2 CPUs),
#        KEYPROOF_PROXY (target/x86_64-unknown-linux-gnu/release/keyproof-proxy, from `cargo build-proxy`),
#        FLOOR (target/release/examples/floor, built here if absent). Needs wrk, nginx, openssl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
keyproof=${KEYPROOF_PROXY:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
floor=${FLOOR:-$repo/target/release/examples/floor}
rounds=${ROUNDS:-3} secs=${SECONDS_EACH:-8} conns_list=${CONNS:-32 1} routes=${ROUTES:-plain su} key=${KEY:-p256} paced=${PACED:-1}
placements=${PLACEMENTS:-shared pods}
for pl in $placements; do
  case $pl in shared) ;; pods) [ "$(nproc)" -ge 2 ] || { echo "PLACEMENTS: pods needs 2 CPUs" >&2; exit 2; };;
    *) echo "PLACEMENTS: unknown placement $pl (shared, pods)" >&2; exit 2;; esac
done
case $key in p256|ed25519) ;; *) echo "KEY must be p256 or ed25519" >&2; exit 2;; esac
"$repo/proxy/layout/check.sh" "$keyproof" || true
[ -x "$floor" ] || (cd "$repo" && cargo build --release --locked -q -p keyproof-stepup --example floor)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
            [ -f "$work/backend.pid" ] && kill "$(cat "$work/backend.pid")" 2>/dev/null || true; }
trap cleanup EXIT
"$repo/../shared/bench/gen-certs.sh" "$work/certs" >/dev/null
c=$work/certs
if [ "$key" = ed25519 ]; then
  # The same CA (P-256) certifies Ed25519 workload keys, with the same names.
  for who in server client; do
    openssl genpkey -algorithm ed25519 -out "$c/$who.key" 2>/dev/null
    openssl req -new -key "$c/$who.key" -subj "/O=bench" -out "$c/$who.csr" 2>/dev/null
    openssl x509 -req -in "$c/$who.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial -days 7 \
      -extfile "$c/$who.ext" -out "$c/$who.crt" 2>/dev/null
  done
fi
openssl x509 -in "$c/client.crt" -outform DER -out "$c/client.der"
openssl pkcs8 -topk8 -nocrypt -in "$c/client.key" -outform DER -out "$c/client.pk8"
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
  wrk -t1 -c32 -d1s "http://127.0.0.1:15001/$route" >/dev/null   # warm-up: connection, kept nonces
done
echo "function delay() return 10 end" > "$work/pace.lua"
for pl in $placements; do echo "round conns route rps p50_us p99_us trips errors in_cpu_us out_cpu_us" > "$work/rows.$pl"; done
# place PLACEMENT: pins (every thread of) the callee's pod, IN and nginx, and the caller's OUT; wrk
# is started pinned through $caller.
caller=()
place() {
  local all="0-$(($(nproc) - 1))" callee_cpu caller_cpu ng
  if [ "$1" = pods ]; then callee_cpu=1 caller_cpu=0; caller=(taskset -c 0); else callee_cpu=$all caller_cpu=$all; caller=(); fi
  ng=$(cat "$work/backend.pid")
  for p in "${pids[0]}" "$ng" $(pgrep -P "$ng"); do taskset -a -cp "$callee_cpu" "$p" >/dev/null; done
  taskset -a -cp "$caller_cpu" "${pids[1]}" >/dev/null
}
: > "$work/floor"
# One wrk run: ROUND CONNS ROUTE LABEL [wrk options]; appends a row.
measure() {
  local r=$1 conns=$2 route=$3 label=$4; shift 4
  before=$(inbound_requests); ci0=$(cpu "${pids[0]}"); co0=$(cpu "${pids[1]}")
  out=$("${caller[@]}" wrk -t1 -c"$conns" -d"${secs}s" --latency "$@" "http://127.0.0.1:15001/$route")
  after=$(inbound_requests); ci1=$(cpu "${pids[0]}"); co1=$(cpu "${pids[1]}")
  reqs=$(awk '/requests in/{print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  p50=$(to_us "$(awk '$1=="50%"{print $2}' <<<"$out")"); p99=$(to_us "$(awk '$1=="99%"{print $2}' <<<"$out")")
  errs=$( (grep -E 'Non-2xx|Socket errors' <<<"$out" || true) | grep -oE '[0-9]+' | paste -sd+ | bc 2>/dev/null || true)
  trips=$(echo "scale=4; ($after-$before)/$reqs" | bc)
  in_cpu=$(echo "scale=1; ($ci1-$ci0)*1000000/$tck/$reqs" | bc); out_cpu=$(echo "scale=1; ($co1-$co0)*1000000/$tck/$reqs" | bc)
  echo "$r $conns $label $rps $p50 $p99 $trips ${errs:-0} $in_cpu $out_cpu" >> "$work/rows.$pl"
}
# Field I (1-based) of the row of round R, connections C, route P.
field() { awk -v r="$1" -v c="$2" -v p="$3" -v i="$4" '$1==r && $2==c && $3==p {print $i}' "$work/rows.$pl"; }
for r in $(seq "$rounds"); do
 for pl in $placements; do
  place "$pl"
  for conns in $conns_list; do
    for route in $routes; do
      measure "$r" "$conns" "$route" "$route"
    done
    su_rps=$(field "$r" "$conns" su 4); plain_p50=$(field "$r" "$conns" plain 5)
    if [ "$paced" = 1 ] && [ "$conns" -gt 1 ] && [ -n "$su_rps" ] && [ -n "$plain_p50" ]; then
      # As many connections as su's rate needs at 10 ms + plain's p50 each.
      pc=$(awk -v rps="$su_rps" -v p50="$plain_p50" 'BEGIN { n = int(rps * (10000 + p50) / 1e6 + 0.999); print (n < 1 ? 1 : n) }')
      measure "$r" "$pc" plain plain@su -s "$work/pace.lua"
      # Filed under the connection count it is compared with.
      awk -v r="$r" -v c="$conns" -v pc="$pc" '$1==r && $2==pc && $3=="plain@su" {$2=c} {print}' "$work/rows.$pl" > "$work/rows.tmp"
      mv "$work/rows.tmp" "$work/rows.$pl"
    fi
  done
 done
 place shared
  "$floor" "$c/client.der" "$c/client.pk8" >> "$work/floor"
done
curl -s http://127.0.0.1:15092/metrics | grep -E '^keyproof_stepup_(verifications_total\{result="(ok|missing|replay|bad_nonce|expired)"|challenges_total|nonce_table_full_total|nonces_outstanding)' || true
for pl in $placements; do
echo "== placement: $pl"
python3 - "$work/rows.$pl" "$work/floor" "$key" <<'PY'
import sys, statistics as st
rows=[l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
floors=[dict(kv.split('=') for kv in l.split()[1:]) for l in open(sys.argv[2]).read().splitlines()]
med=lambda xs: st.median(xs)
fl={k: med(float(f[k]) for f in floors) for k in ('sign_us','verify_us','floor_us')}
alg=floors[0]['alg'] if floors else sys.argv[3]
print(f"crypto floor ({alg}, median of {len(floors)}): sign {fl['sign_us']:.1f} us + verify {fl['verify_us']:.1f} us = {fl['floor_us']:.1f} us")
print(f"{'conns':>5} {'route':6} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'trips/req':>9} {'errors':>6} {'in cpu us/req':>13} {'out cpu us/req':>14}")
for c in dict.fromkeys(r[1] for r in rows):
    for p in dict.fromkeys(r[2] for r in rows if r[1]==c):
        sel=[r for r in rows if r[1]==c and r[2]==p]
        m=lambda i: med(float(r[i]) for r in sel)
        print(f"{c:>5} {p:6} {m(3):9.0f} {m(4):8.0f} {m(5):8.0f} {m(6):9.3f} {m(7):6.0f} {m(8):13.1f} {m(9):14.1f}")
for c in dict.fromkeys(r[1] for r in rows):
    pairs=[(a,b) for a in rows if a[1]==c and a[2]=='su' for b in rows if b[1]==c and b[2]=='plain' and b[0]==a[0]]
    if not pairs: continue
    ratio=lambda i: med(float(a[i])/float(b[i]) for a,b in pairs)
    diff=lambda f: med(f(a)-f(b) for a,b in pairs)
    extra_in=diff(lambda r: float(r[8])); extra_out=diff(lambda r: float(r[9]))
    extra=diff(lambda r: float(r[8])+float(r[9])); dp50=diff(lambda r: float(r[4]))
    print(f"{c} conns, step-up / plain: throughput x{ratio(3):.2f}  p50 x{ratio(4):.2f}  p99 x{ratio(5):.2f}")
    print(f"  extra CPU per step-up request: inbound {extra_in:.1f} + outbound {extra_out:.1f} = {extra:.1f} us"
          f" = x{extra/fl['floor_us']:.2f} floor (target <= x1.2: {'met' if extra <= 1.2*fl['floor_us'] else 'NOT met'})")
    paced=[(a,b) for a in rows if a[1]==c and a[2]=='su' for b in rows if b[1]==c and b[2]=='plain@su' and b[0]==a[0]]
    if paced:
        pd=lambda f: med(f(a)-f(b) for a,b in paced)
        pe=pd(lambda r: float(r[8])+float(r[9]))
        print(f"  against plain paced to the step-up rate ({med(float(b[3]) for a,b in paced):.0f} vs {med(float(a[3]) for a,b in paced):.0f} req/s):"
              f" inbound {pd(lambda r: float(r[8])):.1f} + outbound {pd(lambda r: float(r[9])):.1f} = {pe:.1f} us = x{pe/fl['floor_us']:.2f} floor")
    print(f"  p50 step-up - plain: {dp50:.0f} us = x{dp50/fl['floor_us']:.2f} floor"
          + (f" (target at one connection <= x1.5: {'met' if dp50 <= 1.5*fl['floor_us'] else 'NOT met'})" if c=='1' else ""))
PY
done
