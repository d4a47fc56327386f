#!/usr/bin/env bash
# Renewals per second through `keyproof-ca serve`, a new mutual-TLS
# connection for every renewal, with the CA's state in three places, side by
# side in one run, in interleaved rounds:
#
#   dir     one replica, state in a CA directory (ledger.jsonl, group commit
#           with one fsync per batch): the embedded default
#   pg1     one replica on PostgreSQL (`serve --store`; the ledger batch is
#           one INSERT in one transaction, committed before any certificate
#           of the batch is handed out)
#   pg2     two replicas on the same database, the load spread over both
#
# The load generator is benches' renew-load (the one behind README.md's "CA:
# renewals through keyproof-ca serve"), --new-connection: every renewal
# opens a new connection and presents the certificate its previous renewal
# returned. One CA (one init), so all three serve the same keys: the
# PostgreSQL replicas get its documents with `keyproof-ca migrate`.
#
# PostgreSQL 15 (Debian's /usr/lib/postgresql/15/bin) is started here on a
# free loopback port in a temp dir, as the `postgres` user when run as root,
# with its defaults for durability (fsync on, synchronous_commit on): the
# directory CA fsyncs its ledger too, so the comparison is like for like.
# Nothing is pinned: the machine is shared, and the database, the replicas
# and the load generator compete for the same cores, as they would on one
# node. The load average is printed before and after.
#
# Prints per round and the median per setup: renewals/s, errors, and CPU per
# renewal (utime+stime from /proc over the run) of the replicas and of
# PostgreSQL (the postmaster and its backends).
#
# usage: benches/ca-store.sh
#   env: ROUNDS (3), SECONDS_EACH (8), CONC (32: renew-load workers),
#        CA (target/release/keyproof-ca), RENEW_LOAD (target/release/renew-load);
#        build both with
#          cargo build --release --locked -p keyproof-ca -p keyproof-benches --bin keyproof-ca --bin renew-load
#        PG_BIN (/usr/lib/postgresql/15/bin); KEEP=1 keeps the work dir.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
ca=${CA:-$repo/target/release/keyproof-ca}
rl=${RENEW_LOAD:-$repo/target/release/renew-load}
pg_bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
rounds=${ROUNDS:-3} secs=${SECONDS_EACH:-8} conc=${CONC:-32}
for t in "$ca" "$rl" "$pg_bin/initdb" "$pg_bin/pg_ctl"; do
  [ -x "$t" ] || { echo "missing $t (see the usage at the top of $0)" >&2; exit 2; }
done
command -v psql >/dev/null || { echo "missing psql" >&2; exit 2; }

work=$(mktemp -d /tmp/kp-castore-XXXXXX)
chmod 0755 "$work"
pids=()
as_pg=()
if [ "$(id -u)" -eq 0 ]; then as_pg=(runuser -u postgres --); fi
pgdata=$work/pg/data
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -f "$pgdata/postmaster.pid" ]; then
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdata" -m immediate stop >/dev/null 2>&1 || true
  fi
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # admin port
  for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/ready")" = 200 ] && return 0
    sleep 0.1
  done
  echo "replica with admin port $1 never became ready; logs in $work" >&2; KEEP=1; return 1
}
cpu_ticks() { # pids...: utime+stime summed
  local t=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
pg_pids() { # the postmaster and its children
  local pm; pm=$(head -1 "$pgdata/postmaster.pid")
  echo "$pm" $(pgrep -P "$pm" || true)
}
hz=$(getconf CLK_TCK)

# PostgreSQL.
mkdir -p "$work/pg"
[ ${#as_pg[@]} -eq 0 ] || chown postgres:postgres "$work/pg"
pg_port=$(free_port)
"${as_pg[@]}" "$pg_bin/initdb" -D "$pgdata" -U postgres -A trust -E UTF8 >/dev/null
cat >>"$pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/pg'
max_connections = 200
EOF
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pgdata" -l "$work/pg/log" -w start >/dev/null
psql -X -q -h "$work/pg" -p "$pg_port" -U postgres -c 'CREATE DATABASE bench'
url="postgres://postgres@127.0.0.1:$pg_port/bench?sslmode=disable"

# One CA: a directory for `dir`, a copy moved into PostgreSQL (keys stay in
# the copy, its --dir) for `pg1` and `pg2`.
"$ca" init --dir "$work/ca" --trust-domain bench.local >/dev/null 2>&1
cp -a "$work/ca" "$work/keys"
"$ca" migrate --dir "$work/keys" --store "$url" >/dev/null 2>"$work/migrate.log" \
  || { cat "$work/migrate.log" >&2; exit 1; }

start_replica() { # name, extra serve args...; prints "pid port admin"
  local name=$1; shift
  local port admin
  port=$(free_port); admin=$(free_port)
  "$ca" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --rate-limit 0 "$@" >"$work/$name.out" 2>"$work/$name.log" &
  local pid=$!
  pids+=("$pid")
  wait_ready "$admin"
  echo "$pid $port $admin"
}

read -r dir_pid dir_port _ < <(start_replica dir --dir "$work/ca")
read -r a_pid a_port _ < <(start_replica pg-a --store "$url" --dir "$work/keys")
read -r b_pid b_port _ < <(start_replica pg-b --store "$url" --dir "$work/keys")
# Every pid goes into pids[] inside the subshell only: remember them here.
pids+=("$dir_pid" "$a_pid" "$b_pid")

run() { # setup name, renew-load --dir, server pids (comma list), addrs...
  local name=$1 dir=$2 spids=$3; shift 3
  local addrs=() a
  for a in "$@"; do addrs+=(--addr "$a"); done
  local s0 p0 s1 p1 out
  s0=$(cpu_ticks ${spids//,/ }); p0=$(cpu_ticks $(pg_pids))
  out=$("$rl" --dir "$dir" "${addrs[@]}" --seconds "$secs" --concurrency "$conc" --new-connection 2>>"$work/load-$name.log")
  s1=$(cpu_ticks ${spids//,/ }); p1=$(cpu_ticks $(pg_pids))
  local n rate err
  n=$(sed -n 's/.* renewals=\([0-9]*\).*/\1/p' <<<"$out")
  rate=$(sed -n 's/.*renewals_per_sec=\([0-9]*\).*/\1/p' <<<"$out")
  err=$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$out")
  local scpu pcpu
  scpu=$(awk -v t=$((s1 - s0)) -v n="$n" -v hz="$hz" 'BEGIN{ if (n>0) printf "%.0f", t/hz/n*1e6; else print "-" }')
  pcpu=$(awk -v t=$((p1 - p0)) -v n="$n" -v hz="$hz" 'BEGIN{ if (n>0) printf "%.0f", t/hz/n*1e6; else print "-" }')
  printf '%-4s round %s: %6s renewals/s  errors %-4s  serve CPU/renewal %5s us  PostgreSQL CPU/renewal %5s us\n' \
    "$name" "$round" "$rate" "$err" "$scpu" "$pcpu"
  echo "$name $rate $err $scpu $pcpu" >>"$work/results"
}

echo "keyproof-ca renewals, new connection each: $conc workers, ${secs}s per run, $rounds rounds"
echo "commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'); $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
setups=(dir pg1 pg2)
for round in $(seq "$rounds"); do
  # The order rotates from round to round, so no setup always runs first.
  for k in 0 1 2; do
    case ${setups[$(((k + round - 1) % 3))]} in
      dir) run dir "$work/ca" "$dir_pid" "127.0.0.1:$dir_port" ;;
      pg1) run pg1 "$work/keys" "$a_pid" "127.0.0.1:$a_port" ;;
      pg2) run pg2 "$work/keys" "$a_pid,$b_pid" "127.0.0.1:$a_port" "127.0.0.1:$b_port" ;;
    esac
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "median of $rounds rounds:"
for name in dir pg1 pg2; do
  awk -v n="$name" '$1 == n' "$work/results" | sort -k2 -n | awk -v n="$name" '
    { r[NR]=$2; e+=$3; s[NR]=$4; p[NR]=$5 }
    END { m=int((NR+1)/2); printf "%-4s %6s renewals/s  errors %s  serve CPU/renewal %s us  PostgreSQL CPU/renewal %s us\n", n, r[m], e, s[m], p[m] }'
done
# The ledger holds every renewal of pg1 and pg2 once (serials unique).
"$ca" ledger export --store "$url" --dir "$work/keys" | python3 -c '
import json, sys
serials = [json.loads(l)["serial"] for l in sys.stdin if l.strip()]
print(f"PostgreSQL ledger: {len(serials)} entries, {len(serials) - len(set(serials))} serials twice")'
