#!/bin/bash
# Runs docmail's main job on the embedded default: the sample jobs in examples/jobs/ are dropped into a
# fresh spool under target/demo/, one `docmail run` delivers them to a local Maildir, and the result is
# shown: the spool as `ls` sees it, the log lines, and the first message.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release
demo=target/demo
rm -rf "$demo"
mkdir -p "$demo/spool/incoming"
# Documents first, manifests last: the order the upload contract asks of the back office.
cp examples/jobs/*.pdf "$demo/spool/incoming/"
cp examples/jobs/*.xml "$demo/spool/incoming/"
echo "== docmail run --config examples/docmail.toml"
target/release/docmail run --config examples/docmail.toml
echo
echo "== the spool afterwards"
(cd "$demo/spool" && for d in incoming active deferred failed sent receipts; do printf '%-9s %s\n' "$d/" "$(ls "$d" | tr '\n' ' ')"; done)
echo
first=$(ls "$demo/outbox/new" | head -n 1)
echo "== $(ls "$demo/outbox/new" | wc -l) message(s) in $demo/outbox/new; the first, without its base64 attachment:"
awk '/^Content-Transfer-Encoding: base64/ { skip = 1; print; print "[... base64 ...]"; next }
     skip && /^--/ { skip = 0 }
     !skip' "$demo/outbox/new/$first"
