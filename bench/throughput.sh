#!/bin/bash
# Throughput and memory of one `docmail run` delivering a backlog over SMTP, side by side with Postfix's
# smtp-source pushing messages of the same size over one connection (the rate an SMTP client can reach
# against this sink on this machine), and with the cron one-liner docmail replaces (one swaks process
# per job). The sink is Postfix's smtp-sink on loopback. Ratios matter, not absolute numbers: these
# machines are shared and noisy.
#
#   bench/throughput.sh [JOBS]      (default 2000; root for apt-get on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-2000}
work=target/bench
rm -rf "$work/run" && mkdir -p "$work/run"

# smtp-sink and smtp-source come with Postfix; unpack them instead of installing an MTA on this host.
pfx=$work/postfix
if [ ! -x "$pfx/usr/sbin/smtp-sink" ]; then
  (command -v swaks >/dev/null && [ -x /usr/bin/time ]) || {
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q swaks time >/dev/null; }
  ( cd "$work" && apt-get download postfix >/dev/null && dpkg -x postfix_*.deb postfix && rm postfix_*.deb )
fi
command -v swaks >/dev/null && [ -x /usr/bin/time ] || {
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q swaks time >/dev/null; }
export LD_LIBRARY_PATH=$PWD/$pfx/usr/lib/postfix
cargo build --quiet --release
bin=target/release/docmail

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$pfx/usr/sbin/smtp-sink" -u nobody -c "127.0.0.1:$port" 256 > "$work/run/sink.log" 2>&1 &
sink=$!
trap 'kill $sink 2>/dev/null || true' EXIT
sleep 0.3

# The jobs: a 40 KB PDF each, as a back office uploads them.
spool=$PWD/$work/run/spool
mkdir -p "$spool/incoming"
python3 - "$spool/incoming" "$jobs" <<'PY'
import hashlib, sys
d, n = sys.argv[1], int(sys.argv[2])
pdf = open("examples/jobs/INV-2026-000123.pdf", "rb").read()
pdf = pdf + b"%" + b"x" * (40_000 - len(pdf)) + b"\n"
sha = hashlib.sha256(pdf).hexdigest()
for i in range(n):
    open(f"{d}/B{i}.pdf", "wb").write(pdf)
    open(f"{d}/B{i}.xml", "w").write(
        f'<job xmlns="urn:docmail:job:1" id="B{i}"><to>c{i}@example.net</to>'
        f'<var name="customer_name">Customer {i}</var><var name="invoice_number">B{i}</var>'
        f'<attachment file="B{i}.pdf" size="{len(pdf)}" sha256="{sha}"/></job>')
PY
cat > "$work/run/docmail.toml" <<TOML
spool = "$spool"
from = "Shop Billing <billing@shop.example>"
[transport]
kind = "smtp"
url = "smtp://127.0.0.1:$port"
[templates]
dir = "$PWD/examples/templates"
[intake]
linger = "0s"
[archive]
receipts = true
TOML
msglen=$($bin render "$spool/incoming/B0.xml" --config "$work/run/docmail.toml" | wc -c)

now() { date +%s.%N; }
rate() { python3 -c "import sys; n,t=int(sys.argv[1]),float(sys.argv[2]); print(f'{n/t:8.1f}')" "$@"; }

t0=$(now)
/usr/bin/time -f %M -o "$work/run/source.rss" "$pfx/usr/sbin/smtp-source" -d -s 1 -m "$jobs" -l "$msglen" \
  -f billing@shop.example -t c@example.net "127.0.0.1:$port"
t_source=$(python3 -c "print($(now) - $t0)")

t0=$(now)
/usr/bin/time -f %M -o "$work/run/docmail.rss" $bin run --config "$work/run/docmail.toml" 2> "$work/run/docmail.log"
t_docmail=$(python3 -c "print($(now) - $t0)")
sent=$(ls "$spool/sent" | wc -l)
[ "$sent" -eq "$jobs" ] || { echo "only $sent of $jobs jobs sent"; tail -5 "$work/run/docmail.log"; exit 1; }

# The cron one-liner: one process and one connection per job. A tenth of the jobs is enough to see it.
few=$(( jobs / 10 ))
t0=$(now)
for i in $(seq 1 "$few"); do
  swaks --silent 2 --server 127.0.0.1 --port "$port" --from billing@shop.example --to "c$i@example.net" \
    --attach @"$spool/sent/B$i/documents/B$i.pdf" >/dev/null
done
t_swaks=$(python3 -c "print($(now) - $t0)")

printf '\n%-44s %10s %12s %14s\n' "client ($jobs messages of $msglen bytes)" "seconds" "messages/s" "peak RSS KiB"
printf '%-44s %10.2f %12s %14s\n' "smtp-source -d -s 1 (one connection)" "$t_source" "$(rate "$jobs" "$t_source")" "$(cat "$work/run/source.rss")"
printf '%-44s %10.2f %12s %14s\n' "docmail run (drop -> sent/, one connection)" "$t_docmail" "$(rate "$jobs" "$t_docmail")" "$(cat "$work/run/docmail.rss")"
printf '%-44s %10.2f %12s %14s\n' "swaks per job ($few jobs, cron one-liner)" "$t_swaks" "$(rate "$few" "$t_swaks")" "-"
python3 -c "
s, d, w = $jobs / $t_source, $jobs / $t_docmail, $few / $t_swaks
print(f'\ndocmail reaches {d / s:.0%} of smtp-source\'s rate and {d / w:.1f}x the per-job one-liner\'s.')"
