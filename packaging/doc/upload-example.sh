#!/bin/sh
# Example upload for the back office's cron job: send every job in $OUTBOX to docmail, then fetch
# and delete the receipts of finished jobs into $RECEIPTS.
#
# A job is one manifest (ID.xml) and the documents it names. The documents go first, the manifest
# last; each file is uploaded under a temporary name (".part", which docmail never touches) and
# renamed into place, so docmail never sees a half-written file.
#
#   OUTBOX=/srv/backoffice/outbox RECEIPTS=/srv/backoffice/receipts \
#     upload-example.sh backoffice@shop.example
set -eu

DEST=${1:?usage: upload-example.sh USER@HOST}
OUTBOX=${OUTBOX:-./outbox}
RECEIPTS=${RECEIPTS:-./receipts}
SSH_KEY=${SSH_KEY:-$HOME/.ssh/id_ed25519}

batch=$(mktemp)
trap 'rm -f "$batch"' EXIT

for manifest in "$OUTBOX"/*.xml; do
	[ -e "$manifest" ] || break
	job=$(basename "$manifest" .xml)
	# the documents of this job: every file="..." the manifest names
	for doc in $(sed -n 's/.*file="\([^"]*\)".*/\1/p' "$manifest"); do
		printf 'put "%s/%s" "%s.part"\nrename "%s.part" "%s"\n' \
			"$OUTBOX" "$doc" "$doc" "$doc" "$doc" >>"$batch"
	done
	printf 'put "%s" "%s.xml.part"\nrename "%s.xml.part" "%s.xml"\n' \
		"$manifest" "$job" "$job" "$job" >>"$batch"
done

# receipts of finished jobs (sent or failed): fetch them into a fresh directory
fetched=$(mktemp -d)
trap 'rm -f "$batch"; rm -rf "$fetched"' EXIT
printf -- '-get /receipts/*.xml "%s/"\n' "$fetched" >>"$batch"

sftp -q -b "$batch" -i "$SSH_KEY" -o BatchMode=yes "$DEST"

# a job is uploaded: move it out of the outbox so that the next cron run does not send it again
for manifest in "$OUTBOX"/*.xml; do
	[ -e "$manifest" ] || break
	mkdir -p "$OUTBOX/done"
	for doc in $(sed -n 's/.*file="\([^"]*\)".*/\1/p' "$manifest"); do
		mv "$OUTBOX/$doc" "$OUTBOX/done/"
	done
	mv "$manifest" "$OUTBOX/done/"
done

# delete on the server exactly the receipts that were fetched, then keep them
mkdir -p "$RECEIPTS"
: >"$batch"
for r in "$fetched"/*.xml; do
	[ -e "$r" ] || break
	printf -- '-rm "/receipts/%s"\n' "$(basename "$r")" >>"$batch"
done
if [ -s "$batch" ]; then
	sftp -q -b "$batch" -i "$SSH_KEY" -o BatchMode=yes "$DEST"
	mv "$fetched"/*.xml "$RECEIPTS"/
fi
exit 0
