#!/usr/bin/env bash
# How much of hot-functions.txt a release binary's symbols still match.
# Symbol names carry a hash of their crate's metadata, which includes the
# dependency features cargo unified for the build and the compiler flags:
# `cargo build --release --workspace` unifies features with the test and
# bench crates (tonic, axum...) and matches about half the list, a dynamic
# `cargo build --release` a quarter; `cargo build-proxy` (the static build
# the container ships) matches it all. A poor match costs resident code,
# not correctness.
# usage: proxy/layout/check.sh [BINARY]   (default target/x86_64-unknown-linux-gnu/release/keyproof-proxy)
# exit:  0 when at least 90% match, 1 otherwise (with advice on stderr)
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/../..")
bin=${1:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
total=$(grep -c . "$here/hot-functions.txt")
found=$(nm --defined-only "$bin" | awk '{print $3}' | sort -u |
  comm -12 - <(sort -u "$here/hot-functions.txt") | wc -l)
pct=$((100 * found / total))
echo "code layout: $found of $total hot functions found in $bin ($pct%)"
if [ "$pct" -lt 90 ]; then
  echo "  the layout list does not match this build: build the proxy as the container does," >&2
  echo "  cargo build-proxy (or regenerate: proxy/layout/profile.sh)" >&2
  exit 1
fi
