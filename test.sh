#!/usr/bin/env bash
# The test command (README.md): installs what the end-to-end tests drive,
# runs every fuzz target for 20 s, then `cargo test --workspace --locked`.
#
#   ./test.sh
#
# On a fresh Debian machine with only the Rust toolchain, run it as root: it
# installs openssl, curl, prometheus (with promtool), yamllint, nginx, for
# the transparent-mesh tests iptables, iproute2, tcpdump, PostgreSQL and stunnel,
# and for the PKCS#11 tests SoftHSM2 and OpenSC's pkcs11-tool (softhsm2,
# opensc), from apt; checkov and kubernetes-validate in a venv at /opt/keyproof-ci (linked
# into /usr/local/bin); http-message-signatures, pyOpenSSL and websockets in
# a venv at /opt/keyproof-interop (the independent RFC 9421 implementation the
# step-up interop tests sign and verify with, and the WebSocket client and
# server of the WebSocket tests); and cargo-fuzz. Whatever is already
# there is left alone, so later runs install nothing and need no root.
#
# With `CI` set, a deploy/ check whose tool is missing fails instead of
# printing a notice and skipping (tests/tests/deploy_checks.rs), and so do
# the PKCS#11 tests without SoftHSM2 (tests/tests/pkcs11_*.rs). kubectl is
# not installed here (it is not in Debian's archive): without it the
# kustomize check is skipped, or fails when `CI` is set.
#
# Without any of this, `cargo test --workspace --exclude keyproof-tests` runs
# every crate's own tests, which need no external tool.
set -euo pipefail
cd "$(dirname "$0")"

export DEBIAN_FRONTEND=noninteractive

# Everything that needs installing is collected first, so that a run without
# root can say in one message what is missing instead of failing half-way.
apt_pkgs=(openssl curl prometheus yamllint nginx iptables iproute2 tcpdump postgresql postgresql-client stunnel4 softhsm2 opensc strace)
missing_apt=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing_apt+=("$p"); done
# Only for a machine that has less than the CI image: the venvs below need
# python3 with ensurepip (Debian splits it into python3-venv), and the fuzz
# build compiles libFuzzer, which is C++.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing_apt+=(python3 python3-venv)
fi
if ! command -v c++ >/dev/null 2>&1; then
  missing_apt+=(g++)
fi

# deploy/ checks (tests/tests/deploy_checks.rs): checkov and kubernetes-validate
# in their own venv (checkov pins older boto3/botocore than the image's awscli).
need_ci_venv=false
if ! command -v checkov >/dev/null 2>&1 || ! command -v kubernetes-validate >/dev/null 2>&1; then
  need_ci_venv=true
fi

# Step-up interop: an independent RFC 9421 implementation (Python), and a
# real WebSocket client and server (tests/tests/proxy_websocket.rs), in their
# own venv so the image's Python packages stay as they are.
need_interop_venv=false
if [ ! -x /opt/keyproof-interop/bin/python ] || ! /opt/keyproof-interop/bin/python -c 'import http_message_signatures, OpenSSL, websockets' 2>/dev/null; then
  need_interop_venv=true
fi

if [ ${#missing_apt[@]} -gt 0 ] || $need_ci_venv || $need_interop_venv; then
  if [ "$(id -u)" -ne 0 ]; then
    {
      echo "./test.sh: the end-to-end tests need tools that are not installed, and installing them needs root:"
      if [ ${#missing_apt[@]} -gt 0 ]; then
        echo "  apt packages: ${missing_apt[*]}"
      fi
      if $need_ci_venv; then
        echo "  checkov and kubernetes-validate (venv /opt/keyproof-ci, linked into /usr/local/bin)"
      fi
      if $need_interop_venv; then
        echo "  http-message-signatures, pyOpenSSL and websockets (venv /opt/keyproof-interop)"
      fi
      echo "Run ./test.sh once as root (later runs install nothing), or for the unit tests alone:"
      echo "  cargo test --workspace --exclude keyproof-tests --locked"
    } >&2
    exit 1
  fi
  if [ ${#missing_apt[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "./test.sh: no apt-get (not Debian?): install ${missing_apt[*]} yourself" >&2
      exit 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
  fi
  if $need_ci_venv; then
    python3 -m venv /opt/keyproof-ci
    /opt/keyproof-ci/bin/pip install -q --disable-pip-version-check 'checkov==3.3.30' 'kubernetes-validate==1.37.0'
    ln -sf /opt/keyproof-ci/bin/checkov /opt/keyproof-ci/bin/kubernetes-validate /usr/local/bin/
  fi
  if $need_interop_venv; then
    python3 -m venv /opt/keyproof-interop
    /opt/keyproof-interop/bin/pip install -q --disable-pip-version-check 'http-message-signatures==3.0.0' 'pyOpenSSL' 'websockets==15.0.1'
  fi
fi
# The interop tests fail rather than skip when KEYPROOF_INTEROP is set.
export KEYPROOF_PYTHON=/opt/keyproof-interop/bin/python KEYPROOF_INTEROP=1

# A short fuzzing run (proxy/README.md, "Fuzzing"): every target for 20 s
# from the committed corpus; a crash, failed invariant or hang fails the run.
# cargo-fuzz builds on the stable toolchain with `-s none`. The build
# directory outlives the checkout so that later runs rebuild only what
# changed; where it cannot be created (not root), fuzz/target is used.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  # Into ~/.cargo/bin: no root needed.
  cargo install cargo-fuzz --locked
fi
fuzz_target_dir=${KEYPROOF_FUZZ_TARGET_DIR:-/var/cache/keyproof/fuzz-target}
if ! mkdir -p "$fuzz_target_dir" 2>/dev/null || [ ! -w "$fuzz_target_dir" ]; then
  fuzz_target_dir=$PWD/fuzz/target
fi
KEYPROOF_FUZZ_TARGET_DIR=$fuzz_target_dir bash fuzz/run.sh 20

cargo test --workspace --locked
