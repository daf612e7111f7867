#!/bin/bash
# Every test of docmail, from a fresh Debian 12 machine with the Rust toolchain, as root:
#   1. the real peers the tests talk to (aiosmtpd, openssl) from Debian's packages;
#   2. unit and integration tests: the real binary against real SMTP servers on loopback;
#   3. the fuzz targets, each for a bounded time;
#   4. the system test: the .deb installed in a booted systemd (nspawn), SFTP uploads, Postfix.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in python3-aiosmtpd openssl time; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q "${need[@]}"
fi

echo "== unit and integration tests"
cargo test --all-targets --no-fail-fast

if [ -x fuzz/run.sh ]; then
  echo "== fuzzing"
  fuzz/run.sh "${DOCMAIL_FUZZ_SECONDS:-60}"
fi

if [ -x tests/system/run.sh ]; then
  echo "== system test"
  tests/system/run.sh
fi
