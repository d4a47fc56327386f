#!/usr/bin/env bash
# Memory of a keyproof sidecar pair under load, and where it is: the pair's
# RSS after wrk (as ../shared/bench/compare.sh reads it), throughput, p99
# latency, CPU per request, and per sidecar the resident pages of the
# binary's code and its heap. Binaries given together are measured in
# interleaved rounds, so that they can be compared on a noisy machine.
# usage: benches/pair-rss.sh [BINARY...]   (default target/x86_64-unknown-linux-gnu/release/keyproof-proxy,
#        from `cargo build-proxy`)
#        env: ROUNDS (2), SECONDS_EACH (6), CONNS (32). Needs wrk, nginx, openssl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
bench=$repo/../shared/bench
bins=("${@:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}")
rounds=${ROUNDS:-2} secs=${SECONDS_EACH:-6} conns=${CONNS:-32}
work=$(mktemp -d)
trap '"$bench/sidecars.sh" stop keyproof "$work/certs" "$work/run" >/dev/null 2>&1 || true
      "$bench/sidecars.sh" stop backend "$work/certs" "$work/run" >/dev/null 2>&1 || true' EXIT
"$bench/gen-certs.sh" "$work/certs" >/dev/null
"$bench/sidecars.sh" start backend "$work/certs" "$work/run" >/dev/null
tck=$(getconf CLK_TCK)
for bin in "${bins[@]}"; do "$repo/proxy/layout/check.sh" "$bin" || true; done
for r in $(seq "$rounds"); do for bin in "${bins[@]}"; do
  # Each start begins with none of the binary in the page cache, as a pod on
  # a fresh node: how much code stays resident depends on what is cached
  # (fault-around maps cached neighbours, and the size of the cached folios
  # depends on how the file was written or read), so binaries are compared
  # from the same, empty, state.
  python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$bin"
  pids=$(KEYPROOF_PROXY=$bin "$bench/sidecars.sh" start keyproof "$work/certs" "$work/run" | tail -n1)
  wrk -t1 -c"$conns" -d1s http://127.0.0.1:15001/ >/dev/null
  c0=0; for p in $pids; do c0=$((c0 + $(awk '{print $14+$15}' "/proc/$p/stat"))); done
  out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency http://127.0.0.1:15001/)
  c1=0; rss=0; detail=""
  for p in $pids; do
    c1=$((c1 + $(awk '{print $14+$15}' "/proc/$p/stat")))
    rss=$((rss + $(awk '/VmRSS/{print $2}' "/proc/$p/status")))
    detail+=$(awk -v exe="$(readlink "/proc/$p/exe")" '/^[0-9a-f]+-/{name=$6; perm=$2}
      /^Rss:/{ if (name==exe && perm=="r-xp") code+=$2; else if (name==exe) other+=$2; else if (name=="[heap]") heap+=$2 }
      END{printf " [code %d KiB, other binary %d KiB, heap %d KiB]", code, other, heap}' "/proc/$p/smaps")
  done
  reqs=$(awk '/requests in/{print $1}' <<<"$out")
  echo "round $r $(basename "$bin"): pair RSS $rss KiB, $(awk '/Requests\/sec/{print $2}' <<<"$out") req/s," \
       "p99 $(awk '$1=="99%"{print $2}' <<<"$out")," \
       "$(echo "scale=1; ($c1-$c0)*1000000/$tck/$reqs" | bc) us CPU/req;$detail"
  "$bench/sidecars.sh" stop keyproof "$work/certs" "$work/run" >/dev/null
done; done
