#!/usr/bin/env bash
# The transparent mesh between two pods on one machine, against its
# alternatives, in one run (interleaved rounds, medians):
#   pods A and B: network namespaces on a bridge in a third ("node") one, 10.77.0.1 and 10.77.0.2
#   B: nginx 0.0.0.0:8080, PostgreSQL 0.0.0.0:5432, a bulk source 0.0.0.0:5001 (sends BULK_MB per connection)
#   A and B: a keyproof sidecar each (root, one worker thread) and `keyproof-proxy redirect --proxy-uid 0`;
#            a stunnel pair in TCP mode (A 127.0.0.1:25xxx -> B :26xxx, mutual TLS 1.3, the same certificates)
# (a) HTTP, wrk in A as uid 65534:
#   explicit     wrk -> A outbound 127.0.0.1:15001 (Host b.bench) -> mTLS -> B inbound :15443 -> nginx
#   intercepted  wrk -> http://10.77.0.2:8080/ -> A nat -> A outbound -> mTLS to 10.77.0.2:8080 -> B nat -> B inbound -> nginx
#   target: intercepted within 10% of explicit (throughput, and CPU per request of both sidecars)
# (b) TCP, clients in A as uid 65534:
#   bulk      one connection reads BULK_MB from B's source, timed; CPU of both tunnel ends from /proc
#   req/resp  pgbench -S (select-only, CLIENTS connections) against PostgreSQL in B
#   keyproof  the client dials B's own address (10.77.0.2:5001 / :5432): redirected, HTTP/2 CONNECT tunnel
#   stunnel   the client dials A's stunnel (127.0.0.1:25001 / :25432)
#   target: keyproof throughput >= 1.2x stunnel's, CPU per byte (per transaction) <= 0.8x
# Placements (PLACEMENTS, each round runs every load in each):
#   shared  every process free to run on every vCPU: two pods sharing one node's CPUs
#   pods    each pod's processes on a vCPU of their own (A: cpu 0, B: cpu 1), as two pods on two nodes;
#           the clients in A too. Set with taskset on every process of each namespace between placements.
# Before the transparent features are in the binary (no `redirect` subcommand), only the explicit HTTP
# hop and the stunnel rows run; the rest print "not run".
# usage: sudo benches/transparent.sh   (root: namespaces and iptables)
#   env: ROUNDS (3), SECONDS_EACH (8), CONNS (32: wrk connections), CLIENTS (8: pgbench clients), BULK_MB (400),
#        WORKERS (1: each sidecar's runtime.worker_threads), KINDS ("http bulk rr": which loads run),
#        PLACEMENTS ("shared pods": see above; "pods" needs 2 CPUs),
#        BALANCE (shared: the cidr rule's `balance`; B is a pod address, no Service to balance;
#                 "connection" gives each app connection and tunnel a mesh connection of its own),
#        KEYPROOF_PROXY (target/x86_64-unknown-linux-gnu/release/keyproof-proxy, from `cargo build-proxy`),
#        KEEP (1: leave the work directory). Needs ip, iptables, wrk, nginx, stunnel4, postgresql-15, pgbench, python3, openssl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
keyproof=${KEYPROOF_PROXY:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
rounds=${ROUNDS:-3} secs=${SECONDS_EACH:-8} workers=${WORKERS:-1} conns=${CONNS:-32} clients=${CLIENTS:-8} bulk_mb=${BULK_MB:-400}
kinds=${KINDS:-http bulk rr} placements=${PLACEMENTS:-shared pods} balance=${BALANCE:-shared}
pgbin=/usr/lib/postgresql/15/bin
for pl in $placements; do
  case $pl in shared) ;; pods) [ "$(nproc)" -ge 2 ] || { echo "PLACEMENTS: pods needs 2 CPUs" >&2; exit 2; };;
    *) echo "PLACEMENTS: unknown placement $pl (shared, pods)" >&2; exit 2;; esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, iptables)" >&2; exit 2; }
for t in ip iptables wrk nginx stunnel4 pgbench python3 openssl "$pgbin/initdb"; do
  command -v "$t" >/dev/null || { echo "missing: $t (./test.sh installs it)" >&2; exit 2; }
done
[ -x "$keyproof" ] || { echo "no proxy at $keyproof: cargo build-proxy, or set KEYPROOF_PROXY" >&2; exit 2; }
"$repo/proxy/layout/check.sh" "$keyproof" || true
# The transparent features: the `redirect` subcommand (and with it SO_ORIGINAL_DST, [[inbound.tcp]], cidr rules).
if "$keyproof" redirect --help >/dev/null 2>&1; then transparent=1; else transparent=0
  echo "NOTE: $keyproof has no 'redirect' subcommand: intercepted HTTP and the keyproof TCP tunnel are not run" >&2; fi
# Rules' `balance` (older binaries share, and refuse the key).
if grep -qa 'a mesh connection per app connection' "$keyproof"; then balance_line="balance = \"$balance\"\n"
else balance_line=""; fi

# Namespace names as tests/src/netns.rs makes them (kp-<pid>-...), so a run killed before its cleanup is
# swept by the next namespace test.
base=kp-$$-bench; node=$base-node; A=$base-a; B=$base-b
a_ip=10.77.0.1 b_ip=10.77.0.2 subnet=10.77.0.0/24
work=$(mktemp -d /tmp/kp-transparent.XXXXXX); chmod 755 "$work"
cleanup() {
  for ns in "$A" "$B" "$node"; do
    for _ in 1 2 3; do pids=$(ip netns pids "$ns" 2>/dev/null || true); [ -n "$pids" ] || break
      kill -9 $pids 2>/dev/null || true; sleep 0.2; done
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
inA() { ip netns exec "$A" "$@"; }
inB() { ip netns exec "$B" "$@"; }
# The CPUs a namespace's processes are pinned to in the placement being run (none: any).
declare -A pinned=()
app() { local ns=$1; shift; local pin=(); [ -n "${pinned[$ns]:-}" ] && pin=(taskset -c "${pinned[$ns]}")
  "${pin[@]}" ip netns exec "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups -- env HOME=/tmp "$@"; }
ip netns add "$node"; ip -n "$node" link set lo up
ip -n "$node" link add br0 type bridge; ip -n "$node" link set br0 up
for p in a b; do
  ns=$base-$p; ip_=$([ $p = a ] && echo $a_ip || echo $b_ip)
  ip netns add "$ns"; ip -n "$ns" link set lo up
  ip -n "$node" link add "v$p" type veth peer name eth0 netns "$ns"
  ip -n "$node" link set "v$p" master br0; ip -n "$node" link set "v$p" up
  ip -n "$ns" addr add "$ip_/24" dev eth0; ip -n "$ns" link set eth0 up
done
# port_open NS ADDR PORT: something accepts there (probed from inside NS as root: not redirected).
port_open() { ip netns exec "$1" timeout 1 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; }
wait_port() { for _ in $(seq 200); do port_open "$@" && return 0; sleep 0.1; done; echo "$1: nothing on $2:$3" >&2; exit 1; }

# Certificates: the shared bench CA (spiffe://bench.local/ns/default/sa/{server,client}).
"$repo/../shared/bench/gen-certs.sh" "$work/certs" >/dev/null
c=$work/certs; client_id=spiffe://bench.local/ns/default/sa/client

# B's apps.
cat > "$work/nginx.conf" <<C
worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.err; daemon on;
events { worker_connections 8192; }
http { access_log off; server { listen 0.0.0.0:8080 backlog=4096; keepalive_requests 100000000;
  location / { return 200 "hello from B\n"; } } }
C
inB nginx -c "$work/nginx.conf" -e "$work/nginx.err"
mkdir -p "$work/pg"; chown postgres:postgres "$work/pg"
inB setpriv --reuid=postgres --regid=postgres --clear-groups -- "$pgbin/initdb" -D "$work/pg/data" -U postgres -A trust --no-sync >/dev/null
cat >> "$work/pg/data/postgresql.conf" <<C
listen_addresses = '*'
unix_socket_directories = '$work/pg'
fsync = off
synchronous_commit = off
max_connections = 200
C
echo "host all all $subnet trust" >> "$work/pg/data/pg_hba.conf"
inB setpriv --reuid=postgres --regid=postgres --clear-groups -- "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null
inB setpriv --reuid=postgres --regid=postgres --clear-groups -- pgbench -h "$work/pg" -U postgres -i -s 4 -q postgres >/dev/null 2>&1
# The bulk source: every connection gets BULK_MB of zeros, then EOF.
cat > "$work/source.py" <<'PY'
import socket, sys, threading
n = int(sys.argv[1]) << 20; chunk = bytes(1 << 20)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 5001)); s.listen(64)
def serve(c):
    try:
        left = n
        while left > 0:
            c.sendall(chunk[:min(left, len(chunk))]); left -= min(left, len(chunk))
        c.shutdown(socket.SHUT_WR); c.recv(1)
    finally: c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
# The bulk sink: connects, reads to EOF, prints bytes and seconds.
cat > "$work/sink.py" <<'PY'
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2]); buf = bytearray(1 << 20); got = 0
t = time.perf_counter(); s = socket.create_connection((host, port))
while True:
    k = s.recv_into(buf)
    if not k: break
    got += k
print(got, time.perf_counter() - t)
PY
inB python3 "$work/source.py" "$bulk_mb" > "$work/source.log" 2>&1 & disown
wait_port "$B" 127.0.0.1 8080; wait_port "$B" 127.0.0.1 5432; wait_port "$B" 127.0.0.1 5001

# Sidecars. B: nginx by its own port (explicit) or the original port (intercepted); the tunnel ports.
# A: an exact host for the explicit hop, and the whole subnet for redirected connections.
identity() { printf '[identity]\ntrust_bundle = "%s"\n[identity.files]\ncert = "%s"\nkey = "%s"\n' "$c/ca.crt" "$c/$1.crt" "$c/$1.key"; }
{ identity server
  printf '[inbound]\nlisten = "0.0.0.0:15443"\napp = "127.0.0.1:8080"\n'
  printf '[[inbound.routes]]\npath_prefix = "/"\nallow = ["%s"]\n' "$client_id"
  if [ $transparent = 1 ]; then
    printf '[[inbound.tcp]]\nport = %s\nallow = ["%s"]\n' 5001 "$client_id" 5432 "$client_id"; fi
  printf '[outbound]\nlisten = "127.0.0.1:15001"\n[admin]\nlisten = "0.0.0.0:15090"\n[runtime]\nworker_threads = %s\n' "$workers"
} > "$work/b.toml"
{ identity client
  printf '[outbound]\nlisten = "127.0.0.1:15001"\n'
  [ $transparent = 1 ] && printf 'opaque_ports = [5001, 5432]\n'
  printf '[[outbound.upstreams]]\nhost = "b.bench"\naddress = "%s:15443"\nidentity = "spiffe://bench.local/ns/default/sa/server"\n' "$b_ip"
  [ $transparent = 1 ] && printf "[[outbound.upstreams]]\ncidr = \"%s\"\nidentity = \"spiffe://bench.local/*\"\n$balance_line" "$subnet"
  printf '[inbound]\nlisten = "0.0.0.0:15443"\napp = "127.0.0.1:8080"\n[admin]\nlisten = "0.0.0.0:15090"\n[runtime]\nworker_threads = %s\n' "$workers"
} > "$work/a.toml"
# Not through inA/inB: `ip netns exec` and env exec, so $! is the proxy's own pid (for /proc CPU).
ip netns exec "$B" env RUST_LOG=warn "$keyproof" run --config "$work/b.toml" > "$work/b.log" 2>&1 & kp_b=$!
ip netns exec "$A" env RUST_LOG=warn "$keyproof" run --config "$work/a.toml" > "$work/a.log" 2>&1 & kp_a=$!
disown "$kp_a" "$kp_b"   # cleanup kills them; no job-control noise
wait_port "$B" 127.0.0.1 15443; wait_port "$A" 127.0.0.1 15001
# stunnel pair: A's client end runs as root, so A's redirect (proxy uid 0) leaves its dials alone, and
# B excludes its ports from interception.
for svc in bulk:25001:26001:5001 pg:25432:26432:5432; do IFS=: read -r name a_port b_port app_port <<<"$svc"
  cat >> "$work/stunnel-a.conf" <<C
[$name]
client = yes
accept = 127.0.0.1:$a_port
connect = $b_ip:$b_port
cert = $c/client.crt
key = $c/client.key
CAfile = $c/ca.crt
verifyChain = yes
checkHost = localhost
sslVersionMin = TLSv1.3
C
  cat >> "$work/stunnel-b.conf" <<C
[$name]
accept = 0.0.0.0:$b_port
connect = 127.0.0.1:$app_port
cert = $c/server.crt
key = $c/server.key
CAfile = $c/ca.crt
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
C
done
sed -i "1i pid = $work/stunnel-a.pid\nforeground = no" "$work/stunnel-a.conf"
sed -i "1i pid = $work/stunnel-b.pid\nforeground = no" "$work/stunnel-b.conf"
inB stunnel4 "$work/stunnel-b.conf"; inA stunnel4 "$work/stunnel-a.conf"
wait_port "$A" 127.0.0.1 25001; wait_port "$A" 127.0.0.1 25432
st_a=$(cat "$work/stunnel-a.pid"); st_b=$(cat "$work/stunnel-b.pid")
if [ $transparent = 1 ]; then
  inA "$keyproof" redirect --proxy-uid 0
  inB "$keyproof" redirect --proxy-uid 0 --exclude-inbound-ports 26001,26432
fi

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
# machine: all CPU time and idle time (idle + iowait) so far, in ticks.
machine() { awk '$1=="cpu"{t=0; for(i=2;i<=NF;i++) t+=$i; print t, $5+$6}' /proc/stat; }
tck=$(getconf CLK_TCK)
to_us() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) print v+0; else if (v ~ /ms$/) print v*1000; else if (v ~ /s$/) print v*1000000; else print v }'; }
# Sanity: every path answers before it is measured.
app "$A" curl -sf -o /dev/null -H 'Host: b.bench' http://127.0.0.1:15001/ || { echo "explicit hop failed; logs in $work" >&2; KEEP=1; exit 1; }
paths_http="explicit"; paths_tcp="stunnel"
if [ $transparent = 1 ]; then
  app "$A" curl -sf -o /dev/null "http://$b_ip:8080/" || { echo "intercepted hop failed; logs in $work" >&2; KEEP=1; exit 1; }
  paths_http="explicit intercepted"; paths_tcp="keyproof stunnel"
fi
# place PLACEMENT: (re)pins every process (every thread) of both pods; later clients through `app`.
place() {
  local all ns pid
  all="0-$(($(nproc) - 1))"
  if [ "$1" = pods ]; then pinned=([$A]=0 [$B]=1); else pinned=(); fi
  for ns in "$A" "$B"; do
    for pid in $(ip netns pids "$ns"); do taskset -a -cp "${pinned[$ns]:-$all}" "$pid" >/dev/null 2>&1 || true; done
  done
}
for pl in $placements; do echo "kind round path rate p50_us p99_us errors cpu_a_us cpu_b_us units" > "$work/rows.$pl"; done
# http ROUND PATH
http() {
  local url=http://127.0.0.1:15001/ hdr=(-H "Host: b.bench")
  [ "$2" = intercepted ] && { url=http://$b_ip:8080/; hdr=(); }
  local a0 b0 a1 b1 out reqs rps p50 p99 errs
  a0=$(cpu $kp_a); b0=$(cpu $kp_b)
  out=$(app "$A" wrk -t1 -c"$conns" -d"${secs}s" --latency "${hdr[@]}" "$url")
  a1=$(cpu $kp_a); b1=$(cpu $kp_b)
  reqs=$(awk '/requests in/{print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  p50=$(to_us "$(awk '$1=="50%"{print $2}' <<<"$out")"); p99=$(to_us "$(awk '$1=="99%"{print $2}' <<<"$out")")
  errs=$( (grep -E 'Non-2xx|Socket errors' <<<"$out" || true) | grep -oE '[0-9]+' | paste -sd+ | bc 2>/dev/null || true)
  echo "http $1 $2 $rps $p50 $p99 ${errs:-0} $(echo "scale=2; ($a1-$a0)*1000000/$tck/$reqs" | bc) $(echo "scale=2; ($b1-$b0)*1000000/$tck/$reqs" | bc) req" >> "$work/rows.$pl"
}
# tunnel_pids PATH: the two processes carrying the TCP path.
tunnel_pids() { if [ "$1" = keyproof ]; then echo "$kp_a $kp_b"; else echo "$st_a $st_b"; fi; }
# bulk ROUND PATH: MB/s and CPU ns per byte of each end.
bulk() {
  local dst=("$b_ip" 5001) pa pb a0 b0 a1 b1 got t
  [ "$2" = stunnel ] && dst=(127.0.0.1 25001)
  read -r pa pb <<<"$(tunnel_pids "$2")"
  a0=$(cpu "$pa"); b0=$(cpu "$pb")
  read -r got t <<<"$(app "$A" python3 "$work/sink.py" "${dst[@]}")"
  a1=$(cpu "$pa"); b1=$(cpu "$pb")
  [ "$got" -eq $((bulk_mb << 20)) ] || { echo "bulk over $2: $got bytes, expected $((bulk_mb << 20)); logs in $work" >&2; KEEP=1; exit 1; }
  echo "bulk $1 $2 $(echo "scale=1; $got/1048576/$t" | bc) 0 0 0 $(echo "scale=3; ($a1-$a0)*1000000000/$tck/$got" | bc) $(echo "scale=3; ($b1-$b0)*1000000000/$tck/$got" | bc) byte" >> "$work/rows.$pl"
}
# rr ROUND PATH: pgbench -S transactions/s and CPU us per transaction.
rr() {
  local dst=("$b_ip" 5432) pa pb a0 b0 a1 b1 out tps n lat
  [ "$2" = stunnel ] && dst=(127.0.0.1 25432)
  read -r pa pb <<<"$(tunnel_pids "$2")"
  a0=$(cpu "$pa"); b0=$(cpu "$pb"); m0=$(machine)
  out=$(app "$A" env PGSSLMODE=disable pgbench -n -S -c "$clients" -j 2 -T "$secs" -h "${dst[0]}" -p "${dst[1]}" -U postgres postgres 2>&1)
  a1=$(cpu "$pa"); b1=$(cpu "$pb"); m1=$(machine)
  # Whether the machine's CPUs were the limit: a hop that leaves them idle is waiting, not working.
  echo "rr $1 $2 ($pl): machine busy $(awk -v a="$m0" -v b="$m1" 'BEGIN{split(a,x);split(b,y); printf "%.0f%%", 100*(1-(y[2]-x[2])/(y[1]-x[1]))}')" >&2
  tps=$(awk -F'= ' '/^tps/{split($2,x," "); print x[1]}' <<<"$out" | head -1)
  n=$(awk -F': ' '/number of transactions actually processed/{split($2,x,"/"); print x[1]}' <<<"$out")
  lat=$(awk -F'= ' '/latency average/{split($2,x," "); print x[1]*1000}' <<<"$out")
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "pgbench over $2 failed:"$'\n'"$out" >&2; KEEP=1; exit 1; }
  echo "rr $1 $2 $tps $lat 0 0 $(echo "scale=2; ($a1-$a0)*1000000/$tck/$n" | bc) $(echo "scale=2; ($b1-$b0)*1000000/$tck/$n" | bc) tx" >> "$work/rows.$pl"
}
app "$A" wrk -t1 -c"$conns" -d1s -H 'Host: b.bench' http://127.0.0.1:15001/ >/dev/null   # warm-up
for r in $(seq "$rounds"); do
  for pl in $placements; do
    place "$pl"
    for kind in $kinds; do
      if [ "$kind" = http ]; then ps=$paths_http; else ps=$paths_tcp; fi
      for p in $ps; do "$kind" "$r" "$p"; done
    done
  done
done
place shared
if [ $transparent = 1 ]; then
  inB curl -s --noproxy '*' http://127.0.0.1:15090/metrics | grep -E '^keyproof_tcp_(connections|bytes)_total' || true
  inA curl -s --noproxy '*' http://127.0.0.1:15090/metrics | grep -E '^keyproof_tcp_(connections|bytes)_total' || true
fi
for pl in $placements; do
echo "== placement: $pl"
python3 - "$work/rows.$pl" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
med = st.median
def sel(kind, path): return [r for r in rows if r[0] == kind and r[2] == path]
def m(kind, path, i): return med(float(r[i]) for r in sel(kind, path))
heads = {"http": ("req/s", "p50 us", "p99 us", "errors", "A cpu us/req", "B cpu us/req"),
         "bulk": ("MB/s", "", "", "", "A cpu ns/B", "B cpu ns/B"),
         "rr": ("tx/s", "lat us", "", "", "A cpu us/tx", "B cpu us/tx")}
for kind in ("http", "bulk", "rr"):
    paths = list(dict.fromkeys(r[2] for r in rows if r[0] == kind))
    if not paths: continue
    h = heads[kind]
    print(f"{kind:5} {'path':12}" + "".join(f"{x:>14}" for x in h if x))
    for p in paths:
        vals = [m(kind, p, i) for i, x in zip(range(3, 9), h) if x]
        print(f"{kind:5} {p:12}" + "".join(f"{v:14.2f}" for v in vals))
def ratio(kind, a, b, target_rate, target_cpu, higher_better_label):
    if not sel(kind, a) or not sel(kind, b): return
    rounds = [(x, y) for x in sel(kind, a) for y in sel(kind, b) if x[1] == y[1]]
    rate = med(float(x[3]) / float(y[3]) for x, y in rounds)
    cpu = med((float(x[7]) + float(x[8])) / (float(y[7]) + float(y[8])) for x, y in rounds)
    ok_rate = rate >= target_rate; ok_cpu = cpu <= target_cpu
    print(f"{kind}: {a}/{b} throughput x{rate:.2f} (target >= x{target_rate}: {'met' if ok_rate else 'NOT met'}), "
          f"CPU per {higher_better_label} of both ends x{cpu:.2f} (target <= x{target_cpu}: {'met' if ok_cpu else 'NOT met'})")
ratio("http", "intercepted", "explicit", 0.9, 1.1, "request")
ratio("bulk", "keyproof", "stunnel", 1.2, 0.8, "byte")
ratio("rr", "keyproof", "stunnel", 1.2, 0.8, "transaction")
if sel("http", "explicit") and not sel("http", "intercepted"):
    print("not run: intercepted HTTP, keyproof TCP tunnel (the binary has no `redirect` subcommand)")
PY
done
