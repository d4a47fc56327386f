#!/usr/bin/env bash
# Workload keys in a PKCS#11 token (SoftHSM2) against the same keys in files,
# side by side in one run, in interleaved rounds:
#
#   handshakes: handshake_load (file key, a new full mutual-TLS 1.3
#               handshake per connection) -> IN sidecar; the IN's
#               CertificateVerify is signed by its key (file, or token)
#   step-up:    wrk -> OUT sidecar -> mutual TLS 1.3 -> IN sidecar -> nginx,
#               route /su with `step_up = true`: the OUT signs every request
#               with its key (file, or token); /plain is the same route
#               without step-up, for reference
#
# Two pairs run at once, identical but for `[identity.pkcs11]`: file pair on
# 15443/15001, token pair on 16443/16001, one worker thread per sidecar.
# Both pairs use the *same* keys and certificates (the file keys are
# imported into the token), so the only difference is where the signature is
# made. Production keys are generated in the token and never leave it;
# importing is for this comparison only.
#
# Prints per round and the median: handshakes/s (p50, and the IN sidecar's
# CPU per handshake) per pair, step-up and plain req/s (p50, and both
# sidecars' CPU per request) per pair, the token/file ratios and the extra
# CPU per operation, and the token sidecars'
# keyproof_identity_key_operations_total (all `ok`: the signatures were the
# token's).
#
# usage: benches/pkcs11.sh
#   env: ROUNDS (3), SECONDS_EACH (6), CONC (32: handshake_load clients),
#        CONNS (32: wrk connections),
#        KEYPROOF_PROXY (target/release/keyproof-proxy, `cargo build --release -p keyproof-proxy`:
#                        the dynamically linked build, because the static
#                        `cargo build-proxy` refuses to load a PKCS#11 module;
#                        both pairs run this same binary),
#        HANDSHAKE_LOAD (target/x86_64-unknown-linux-gnu/release/handshake_load, else
#                        target/release/handshake_load; built with
#                        `cargo build --release -p keyproof-benches --bin handshake_load`),
#        CA (keyproof-ca, default target/debug/keyproof-ca),
#        MODULE (/usr/lib/softhsm/libsofthsm2.so).
#   Needs softhsm2, opensc (pkcs11-tool), wrk, nginx, openssl, curl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
keyproof=${KEYPROOF_PROXY:-$repo/target/release/keyproof-proxy}
hl=${HANDSHAKE_LOAD:-$repo/target/x86_64-unknown-linux-gnu/release/handshake_load}
[ -x "$hl" ] || hl=$repo/target/release/handshake_load
ca=${CA:-$repo/target/debug/keyproof-ca}
module=${MODULE:-/usr/lib/softhsm/libsofthsm2.so}
rounds=${ROUNDS:-3} secs=${SECONDS_EACH:-6} conc=${CONC:-32} conns=${CONNS:-32}
for t in "$keyproof" "$hl" "$ca" "$module"; do
  [ -e "$t" ] || { echo "missing $t (see the usage at the top of $0)" >&2; exit 2; }
done
for t in softhsm2-util pkcs11-tool wrk nginx openssl curl; do
  command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 2; }
done
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
            [ -f "$work/backend.pid" ] && kill "$(cat "$work/backend.pid")" 2>/dev/null || true
            [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened; logs in $work" >&2; KEEP=1; return 1; }

# SoftHSM2 with one token, PIN in a 0600 file.
mkdir -p "$work/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/tokens" > "$work/softhsm2.conf"
export SOFTHSM2_CONF=$work/softhsm2.conf
pin=bench-1234
softhsm2-util --init-token --free --label bench --so-pin bench-so-5678 --pin "$pin" >/dev/null
(umask 077; echo "$pin" > "$work/pin")
p11() { pkcs11-tool --module "$module" --token-label bench --login --pin "$pin" "$@"; }

# A trust domain and two P-256 SVIDs with file keys; the same keys into the token.
"$ca" init --dir "$work/ca" --trust-domain bench.local >/dev/null
"$ca" bundle --dir "$work/ca" > "$work/bundle.pem"
id=1
for who in server client; do
  "$ca" issue --dir "$work/ca" --spiffe-id "spiffe://bench.local/ns/default/sa/$who" --dns localhost \
    --key-out "$work/$who.key" --cert-out "$work/$who.crt" >/dev/null
  openssl pkey -in "$work/$who.key" -outform DER -out "$work/$who.priv.der"
  openssl pkey -in "$work/$who.key" -pubout -outform DER -out "$work/$who.pub.der"
  p11 --write-object "$work/$who.priv.der" --type privkey --label "$who" --id "0$id" --usage-sign >/dev/null
  p11 --write-object "$work/$who.pub.der" --type pubkey --label "$who" --id "0$id" >/dev/null
  rm -f "$work/$who.priv.der"; id=$((id + 1))
done

cat > "$work/backend.conf" <<C
worker_processes 1; pid $work/backend.pid; error_log $work/backend.err; daemon on;
events { worker_connections 8192; }
http { access_log off; server { listen 127.0.0.1:18080 backlog=4096; keepalive_requests 100000000;
  location / { return 200 "hello from backend\n"; } } }
C
nginx -c "$work/backend.conf" -e "$work/backend.err"; wait_port 18080

client=spiffe://bench.local/ns/default/sa/client
# identity WHO KIND: [identity] for WHO with its key from a file or the token.
identity() {
  echo "[identity]"; echo "trust_bundle = \"$work/bundle.pem\""
  echo "[identity.files]"; echo "cert = \"$work/$1.crt\""
  if [ "$2" = file ]; then echo "key = \"$work/$1.key\""
  else printf '[identity.pkcs11]\nmodule = "%s"\ntoken_label = "bench"\nkey_label = "%s"\npin_file = "%s"\n' "$module" "$1" "$work/pin"
  fi
}
# pair KIND PREFIX: IN on PREFIX443 (admin PREFIX092), OUT on PREFIX001 (admin PREFIX091).
pair() {
  local kind=$1 p=$2
  { identity server "$kind"; cat <<C
[inbound]
listen = "127.0.0.1:${p}443"
app = "127.0.0.1:18080"
[[inbound.routes]]
path_prefix = "/su"
allow = ["$client"]
step_up = true
[[inbound.routes]]
path_prefix = "/plain"
allow = ["$client"]
[admin]
listen = "127.0.0.1:${p}092"
[runtime]
worker_threads = 1
C
  } > "$work/in-$kind.toml"
  { identity client "$kind"; cat <<C
[outbound]
listen = "127.0.0.1:${p}001"
[[outbound.upstreams]]
host = "*"
address = "127.0.0.1:${p}443"
identity = "spiffe://bench.local/ns/default/sa/server"
[admin]
listen = "127.0.0.1:${p}091"
[runtime]
worker_threads = 1
C
  } > "$work/out-$kind.toml"
  RUST_LOG=warn "$keyproof" run --config "$work/in-$kind.toml" > "$work/in-$kind.log" 2>&1 & pids+=($!)
  RUST_LOG=warn "$keyproof" run --config "$work/out-$kind.toml" > "$work/out-$kind.log" 2>&1 & pids+=($!)
  wait_port "${p}443"; wait_port "${p}001"
}
pair file 15; pair token 16
for p in 15 16; do
  for route in plain su; do
    curl -sf -o /dev/null "http://127.0.0.1:${p}001/$route" || { echo "/$route through pair $p failed; logs in $work" >&2; KEEP=1; exit 1; }
    wrk -t1 -c"$conns" -d1s "http://127.0.0.1:${p}001/$route" >/dev/null   # warm-up: connection, kept nonces
  done
done
ops() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^keyproof_identity_key_operations_total/{print}' | tr '\n' ' '; }
location() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^keyproof_identity_key_location/ && $2==1 {print}'; }
echo "file pair:  IN $(location 15092); OUT $(location 15091)"
echo "token pair: IN $(location 16092); OUT $(location 16091)"

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }   # utime+stime, clock ticks
tck=$(getconf CLK_TCK)
# pids: file IN, file OUT, token IN, token OUT.
in_pid() { if [ "$1" = file ]; then echo "${pids[0]}"; else echo "${pids[2]}"; fi; }
out_pid() { if [ "$1" = file ]; then echo "${pids[1]}"; else echo "${pids[3]}"; fi; }
to_us() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) print v+0; else if (v ~ /ms$/) print v*1000; else if (v ~ /s$/) print v*1000000; else print v }'; }
echo "round kind test rate p50_us errors cpu_us" > "$work/rows"
# CPU per operation is steadier than the rate on a busy machine: the
# handshakes' IN sidecar, the requests' two sidecars, in microseconds.
hs() { # ROUND KIND PORT
  local ip c0 c1 out n rate p50 errs
  ip=$(in_pid "$2"); c0=$(cpu "$ip")
  out=$("$hl" --target "127.0.0.1:$3" --cert "$work/client.crt" --key "$work/client.key" \
    --ca "$work/bundle.pem" --concurrency "$conc" --seconds "$secs" --threads 1 2>&1)
  c1=$(cpu "$ip")
  n=$(grep -oE '[0-9]+ handshakes,' <<<"$out" | awk '{print $1}')
  rate=$(grep -oE '[0-9]+ handshakes/s' <<<"$out" | awk '{print $1}')
  p50=$(grep -oE 'p50 [0-9.]+ ms' <<<"$out" | awk '{print $2*1000}')
  errs=$(grep -oE 'errors [0-9]+' <<<"$out" | awk '{print $2}')
  echo "$1 $2 handshakes ${rate:-0} ${p50:-0} ${errs:-?} $(echo "scale=1; ($c1-$c0)*1000000/$tck/${n:-1}" | bc)" >> "$work/rows"
}
rq() { # ROUND KIND PORT ROUTE
  local ip op i0 o0 i1 o1 out n rate p50 errs
  ip=$(in_pid "$2"); op=$(out_pid "$2"); i0=$(cpu "$ip"); o0=$(cpu "$op")
  out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$3/$4")
  i1=$(cpu "$ip"); o1=$(cpu "$op")
  n=$(awk '/requests in/{print $1}' <<<"$out")
  rate=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  p50=$(to_us "$(awk '$1=="50%"{print $2}' <<<"$out")")
  errs=$( (grep -E 'Non-2xx|Socket errors' <<<"$out" || true) | grep -oE '[0-9]+' | paste -sd+ | bc 2>/dev/null || true)
  echo "$1 $2 $4 ${rate:-0} ${p50:-0} ${errs:-0} $(echo "scale=1; ($i1-$i0+$o1-$o0)*1000000/$tck/${n:-1}" | bc)" >> "$work/rows"
}
for r in $(seq "$rounds"); do
  # Alternate which pair goes first, so that drift falls on both.
  if [ $((r % 2)) = 1 ]; then order="file:15 token:16"; else order="token:16 file:15"; fi
  for kp in $order; do hs "$r" "${kp%%:*}" "${kp##*:}443"; done
  for route in su plain; do
    for kp in $order; do rq "$r" "${kp%%:*}" "${kp##*:}001" "$route"; done
  done
done
echo "token IN  ops: $(ops 16092)"
echo "token OUT ops: $(ops 16091)"
echo "file IN   ops: $(ops 15092)"
python3 - "$work/rows" "$conc" "$conns" "$secs" <<'PY'
import sys, statistics as st
rows=[l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
conc, conns, secs = sys.argv[2:5]
print(f"\n{'round':>5} {'test':10} {'kind':5} {'rate/s':>9} {'p50 us':>8} {'errors':>6} {'cpu us/op':>9}")
for r in rows:
    print(f"{r[0]:>5} {r[2]:10} {r[1]:5} {float(r[3]):9.0f} {float(r[4]):8.0f} {r[5]:>6} {float(r[6]):9.1f}")
print(f"\nmedians ({len(set(r[0] for r in rows))} rounds of {secs} s; handshakes: {conc} clients, a new full mutual-TLS handshake each,"
      f" CPU of the IN sidecar; requests: wrk, {conns} connections, CPU of both sidecars)")
print(f"{'test':10} {'file/s':>9} {'token/s':>9} {'token/file':>10} {'p50 file':>9} {'p50 token':>9} {'cpu file':>9} {'cpu token':>9} {'extra cpu':>9}")
for t in dict.fromkeys(r[2] for r in rows):
    m=lambda k,i: st.median(float(r[i]) for r in rows if r[2]==t and r[1]==k)
    f, k = m('file',3), m('token',3)
    print(f"{t:10} {f:9.0f} {k:9.0f} {k/f if f else 0:10.2f} {m('file',4):7.0f}us {m('token',4):7.0f}us"
          f" {m('file',6):7.1f}us {m('token',6):7.1f}us {m('token',6)-m('file',6):+7.1f}us")
PY
