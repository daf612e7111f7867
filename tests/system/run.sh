#!/bin/bash
# docmail system test (issue 4): the .deb on a booted Debian 12 systemd, SFTP upload, Postfix.
#
#   tests/system/run.sh                 (as root; about 3-6 minutes, most of it the first build)
#
# Builds the package, builds (and caches, keyed by the package list) a bookworm root file system
# with mmdebstrap, boots it with systemd-nspawn, installs the .deb with apt and runs the scenarios
# of issue 4 inside. Touches no service of the host; on any exit it halts the container and removes
# its cgroups and nspawn's leftovers. Ends with "N passed, M failed".
#
# Environment: DOCMAIL_SYSTEST_DIR (default /var/tmp/docmail-systest: rootfs cache, run state),
#              KEEP=1 (leave the container running on exit, for debugging; prints how to enter it).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${DOCMAIL_SYSTEST_DIR:-/var/tmp/docmail-systest}
NAME=docmail-systest-$$
STATE=$WORK/run-$$
ROOTFS=$WORK/rootfs
PKGS="systemd,systemd-sysv,dbus,libnss-systemd,libpam-systemd,ca-certificates,openssh-server,openssh-client,postfix,python3,man-db,procps"
T_START=$SECONDS

PASSED=0 FAILED=0
RESULTS=()
log() { printf '[%4ds] %s\n' $((SECONDS - T_START)) "$*"; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
NSPAWN_PID= LEADER=
cleanup() {
	local rc=$?
	if [ -n "${KEEP:-}" ] && [ -n "$LEADER" ]; then
		log "KEEP=1: container left running; enter with: nsenter -t $LEADER -a bash"
		log "         stop with: kill $NSPAWN_PID; rmdir /sys/fs/cgroup/{systemd,unified}/nspawn-$NAME"
		return
	fi
	if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
		kill -TERM "$NSPAWN_PID" 2>/dev/null   # nspawn: clean halt of the container
		for _ in $(seq 75); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
		kill -0 "$NSPAWN_PID" 2>/dev/null && kill -KILL "$NSPAWN_PID" 2>/dev/null
		sleep 0.5
	fi
	for h in systemd unified; do
		d=/sys/fs/cgroup/$h/nspawn-$NAME
		[ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
	done
	rmdir "/run/systemd/nspawn/propagate/$NAME" /run/systemd/nspawn/propagate /run/systemd/nspawn/locks \
		/run/systemd/nspawn /run/systemd/nspawn-root 2>/dev/null
	rm -rf "$STATE"
	return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run a command inside the container; status, stdout and stderr are the command's own.
cx() {
	nsenter -t "$LEADER" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}
cxsh() { cx bash -c "$1"; }

# scenario NAME FUNCTION: run it, record pass/fail with its own output indented
scenario() {
	local name=$1; shift
	local out rc t0=$SECONDS
	log "--- $name"
	out=$("$@" 2>&1); rc=$?
	[ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/        /'
	if [ $rc -eq 0 ]; then
		PASSED=$((PASSED + 1)); RESULTS+=("PASS  $name ($((SECONDS - t0))s)")
	else
		FAILED=$((FAILED + 1)); RESULTS+=("FAIL  $name ($((SECONDS - t0))s)")
		log "FAIL: $name"
		cxsh 'journalctl -u docmail.service -u docmail.path --no-pager -n 25 -o short-monotonic' 2>&1 | sed 's/^/        | /'
	fi
}
fail() { echo "FAIL: $*"; return 1; }

# wait_for SECONDS COMMAND...: poll (0.2 s) until COMMAND succeeds
wait_for() {
	local until=$((SECONDS + $1)); shift
	while ! "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $until ] || return 1
		sleep 0.2
	done
}

# ---------------------------------------------------------------- host tools
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v lintian >/dev/null || need+=(lintian)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v nsenter >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v pgrep >/dev/null || need+=(procps)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
	log "installing on the host: ${need[*]}"
	apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
		|| die "apt-get install ${need[*]} failed"
fi
mkdir -p "$STATE/share" || die "cannot create $STATE"

# ---------------------------------------------------------------- build
if [ -n "${DOCMAIL_SYSTEST_DEB:-}" ]; then
	DEB=$DOCMAIL_SYSTEST_DEB   # a package built before (debugging the test itself)
else
	log "building the package (packaging/build-deb)"
	"$REPO/packaging/build-deb" >"$STATE/build.log" 2>&1 || { tail -30 "$STATE/build.log"; die "packaging/build-deb failed"; }
	DEB=$(ls -t "$REPO"/target/debian/docmail_*_amd64.deb | head -1)
fi
VERSION=$(dpkg-deb -f "$DEB" Version) || die "no package at $DEB"
cp "$DEB" "$STATE/share/docmail_N.deb"
# N+1 for the upgrade test: the same package with a higher version
rm -rf "$STATE/n1" && dpkg-deb -R "$DEB" "$STATE/n1" \
	&& sed -i "s/^Version: .*/Version: $VERSION+systest1/" "$STATE/n1/DEBIAN/control" \
	&& dpkg-deb -b -Zxz "$STATE/n1" "$STATE/share/docmail_N1.deb" >/dev/null || die "repacking N+1 failed"
rm -rf "$STATE/n1"
log "package $(basename "$DEB") ($VERSION), and $VERSION+systest1 for the upgrade"

# ---------------------------------------------------------------- root file system (cached)
if [ ! -x "$ROOTFS/usr/lib/systemd/systemd" ] || [ "$(cat "$ROOTFS.pkgs" 2>/dev/null)" != "$PKGS" ]; then
	log "building the bookworm root file system (mmdebstrap)"
	rm -rf "$ROOTFS.tmp" "$ROOTFS" "$ROOTFS.pkgs"
	mmdebstrap --variant=minbase --include="$PKGS" bookworm "$ROOTFS.tmp" >"$STATE/mmdebstrap.log" 2>&1 \
		|| { tail -20 "$STATE/mmdebstrap.log"; die "mmdebstrap failed"; }
	mv "$ROOTFS.tmp" "$ROOTFS" && echo "$PKGS" >"$ROOTFS.pkgs"
else
	log "root file system cached: $ROOTFS"
fi

# ---------------------------------------------------------------- boot
for h in systemd unified; do [ -d /sys/fs/cgroup/$h ] && mkdir -p /sys/fs/cgroup/$h/nspawn-$NAME; done
setsid bash -c '
	echo $$ >"$0"
	for h in systemd unified; do
		[ -d /sys/fs/cgroup/$h/nspawn-'"$NAME"' ] && echo $$ >/sys/fs/cgroup/$h/nspawn-'"$NAME"'/cgroup.procs
	done
	exec "$@"' "$STATE/nspawn.pid" \
	systemd-nspawn --quiet --register=no --keep-unit --volatile=overlay -D "$ROOTFS" -M "$NAME" \
		--boot --private-network --console=passive \
		--bind="$STATE/share":/share --bind-ro="$HERE":/systest \
		--capability=CAP_BPF --system-call-filter=bpf \
	>"$STATE/nspawn.log" 2>&1 </dev/null &
for _ in $(seq 50); do [ -s "$STATE/nspawn.pid" ] && break; sleep 0.1; done
NSPAWN_PID=$(cat "$STATE/nspawn.pid" 2>/dev/null) || die "nspawn did not start"
until=$((SECONDS + 60))
while [ -z "$LEADER" ]; do
	kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$STATE/nspawn.log"; die "systemd-nspawn died"; }
	[ $SECONDS -lt $until ] || die "timeout waiting for the container's systemd"
	LEADER=$(pgrep -P "$NSPAWN_PID" -x systemd || true)
	[ -n "$LEADER" ] || sleep 0.1
done
while :; do
	state=$(cx systemctl is-system-running 2>/dev/null)
	case "$state" in running|degraded) break ;; esac
	[ $SECONDS -lt $until ] || die "timeout waiting for boot (state '$state')"
	sleep 0.2
done
log "container booted: $state (leader pid $LEADER)"

# ---------------------------------------------------------------- setup inside
# sftp as the back office: options, then -b BATCH, then the destination last
SFTP="sftp -q -i /root/.ssh/backoffice -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
DEST=backoffice@127.0.0.1
MAILDIR=/home/sink/Maildir
JOBS=/root/jobs

s_install() {
	cxsh 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q /share/docmail_N.deb 2>&1 | tail -3' || return 1
	cxsh 'dpkg-query -W -f="\${Status} \${Version}\n" docmail' | grep -q 'install ok installed' || fail "not installed"
	for u in docmail.path docmail-retry.path; do
		st=$(cx systemctl is-enabled $u); [ "$st" = disabled ] || fail "$u is $st after install (must be disabled)" || return 1
		cx systemctl is-active -q $u && { fail "$u active after install"; return 1; }
	done
	echo "installed, nothing enabled or started"
	cx systemd-run --wait --pipe --quiet --collect -p User=docmail -p StateDirectory=docmail docmail check \
		|| fail "docmail check of the shipped configuration and templates" || return 1
	cx getent passwd docmail >/dev/null || fail "no user docmail" || return 1
	cx id docmail
	cx stat -c '%A %U:%G %n' /var/spool/docmail /var/spool/docmail/{incoming,receipts,active,deferred,failed,sent}
	local want="drwxr-x--- root:docmail-upload /var/spool/docmail
drwxrws--- docmail:docmail-upload /var/spool/docmail/incoming
drwxrws--- docmail:docmail-upload /var/spool/docmail/receipts
drwx------ docmail:docmail /var/spool/docmail/active
drwx------ docmail:docmail /var/spool/docmail/deferred
drwx------ docmail:docmail /var/spool/docmail/failed
drwx------ docmail:docmail /var/spool/docmail/sent"
	[ "$(cx stat -c '%A %U:%G %n' /var/spool/docmail /var/spool/docmail/{incoming,receipts,active,deferred,failed,sent})" = "$want" ] \
		|| fail "spool modes differ from: $want"
}

s_verify() {
	local out
	out=$(cx systemd-analyze verify docmail.path docmail.service docmail-retry.path docmail-retry.timer \
		docmail@check.path docmail@check.service docmail-retry@check.path docmail-retry@check.timer 2>&1)
	echo "${out:-systemd-analyze verify: no output}"
	if printf '%s\n' "$out" | grep -q -i -e 'unknown key' -e 'docmail'; then
		fail "systemd-analyze verify complains about docmail units"
	fi
}

s_security() {
	local host inside
	host=$(systemd-analyze security --offline=yes "$REPO/units/docmail.service" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
	inside=$(cx systemd-analyze security docmail.service 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
	echo "systemd-analyze security docmail.service: $inside (installed, live manager); $host (--offline=yes on the unit file)"
	[ -n "$inside" ] && [ -n "$host" ] || fail "no exposure level" || return 1
	awk -v a="$inside" -v b="$host" 'BEGIN { exit !(a <= 1.5 && b <= 1.5) }' || fail "exposure above 1.5"
}

s_lintian() {
	local out
	out=$(lintian --fail-on error,warning "$STATE/share/docmail_N.deb" 2>&1); local rc=$?
	out=$(printf '%s\n' "$out" | grep -v 'running with root privileges' || true)
	echo "lintian: ${out:-clean (no errors, no warnings)}"
	[ $rc -eq 0 ] || fail "lintian exit $rc"
}

setup_postfix() {
	cxsh '
	set -e
	useradd -m -s /usr/sbin/nologin sink
	postconf -e "myhostname = mail.systest.test" "mydestination = localhost" \
		"inet_interfaces = loopback-only" "inet_protocols = ipv4" "home_mailbox = Maildir/" \
		"virtual_alias_maps = regexp:/etc/postfix/virtual_regexp" "smtpd_tls_security_level = none" \
		"smtp_tls_security_level = none" "maillog_file = /var/log/postfix.log" \
		"smtpd_client_connection_rate_limit = 0" "default_process_limit = 50"
	echo "/.*/ sink@localhost" >/etc/postfix/virtual_regexp
	systemctl restart postfix
	for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/25) 2>/dev/null && break; sleep 0.2; done
	(exec 3<>/dev/tcp/127.0.0.1/25)'
}

setup_docmail() {
	cxsh '
	set -e
	cat >/etc/docmail/docmail.toml <<EOT
spool = "/var/spool/docmail"
from = "Shop Billing <billing@shop.example>"

[transport]
kind = "smtp"
url = "smtp://127.0.0.1:25"
timeout = "10s"

[templates]
dir = "/etc/docmail/templates"
default = "invoice"

[intake]
settle = "10s"

[retry]
first = "5s"
max = "10s"
EOT
	# the retry timer, shortened for the test
	mkdir -p /etc/systemd/system/docmail-retry.timer.d
	printf "[Timer]\nOnActiveSec=\nOnActiveSec=3s\nAccuracySec=1s\n" \
		>/etc/systemd/system/docmail-retry.timer.d/systest.conf
	systemctl daemon-reload'
}

setup_sftp() {
	cxsh '
	set -e
	useradd --system --gid docmail-upload --home-dir /incoming --shell /usr/sbin/nologin backoffice
	usermod -p "*" backoffice
	mkdir -p /root/.ssh /etc/ssh/authorized_keys
	ssh-keygen -q -t ed25519 -N "" -f /root/.ssh/backoffice
	install -m 0644 /root/.ssh/backoffice.pub /etc/ssh/authorized_keys/backoffice
	sed -n "/^Match/,\$p" /usr/share/doc/docmail/examples/sshd_config.docmail-upload \
		>/etc/ssh/sshd_config.d/docmail-upload.conf
	sshd -t
	systemctl restart ssh
	for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null && break; sleep 0.2; done'
	cxsh "echo pwd | $SFTP -b - $DEST" | grep -q 'Remote working directory: /incoming' || fail "sftp login does not land in /incoming"
}

s_setup() {
	setup_postfix || fail "postfix setup" || return 1
	echo "postfix: relay on 127.0.0.1:25, delivering to $MAILDIR"
	setup_docmail || fail "docmail setup" || return 1
	setup_sftp || fail "sftp setup" || return 1
	echo "sshd: chrooted SFTP-only account backoffice (group docmail-upload, key login) from the packaged example"
	cx systemctl enable --now docmail.path 2>&1 || return 1
	cx systemctl is-active docmail.path docmail-retry.path || fail "docmail.path/docmail-retry.path not active"
}

# deliver: wait until every job in the given job dirs arrived; print the check summary
# usage: delivered TIMEOUT DIR...
delivered() {
	local t=$1; shift
	local until=$((SECONDS + t)) out
	while :; do
		out=$(cx python3 /systest/jobs.py check "$MAILDIR" "$@")
		python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(d["delivered"] != d["expected"])' "$out" && break
		[ $SECONDS -lt $until ] || break
		sleep 0.5
	done
	echo "$out"
	python3 -c '
import json,sys
d=json.loads(sys.argv[1])
ok = d["delivered"] == d["expected"] and d["duplicate_count"] == 0 and d["bad_count"] == 0
sys.exit(0 if ok else 1)' "$out"
}

journal_lines() { # journal_lines ID STATUS: count "job=ID status=STATUS" lines of docmail.service
	cxsh "journalctl -u docmail.service -o cat --no-pager | grep -c -- 'job=$1 status=$2'"
}

units_healthy() {
	local p s r
	p=$(cx systemctl is-active docmail.path); s=$(cx systemctl is-failed docmail.service)
	r=$(cx systemctl show -p Result --value docmail.path)
	echo "docmail.path: $p (result $r); docmail.service failed? $s"
	[ "$p" = active ] && [ "$s" != failed ] && [ "$r" = success ]
}

upload() { # upload DIR MODE [PREFIX]
	cxsh "python3 /systest/jobs.py batch $1 $2 ${3:-} >$1/batch.$2 && $SFTP -b $1/batch.$2 $DEST >/dev/null"
}

s_upload() { # s_upload MODE PREFIX
	local mode=$1 d=$JOBS/$2
	cx python3 /systest/jobs.py make "$d" "$2" 2 48213 || return 1
	upload "$d" "$mode" || fail "sftp upload ($mode)" || return 1
	delivered 60 "$d" || fail "not every job arrived intact" || return 1
	echo "both mails arrived; attachments byte-identical (sha256)"
	local id n
	for id in "$2-0000" "$2-0001"; do
		n=$(journal_lines "$id" sent)
		echo "journal: $n line(s) 'job=$id status=sent'"
		[ "$n" = 1 ] || fail "expected exactly one journal line for $id" || return 1
	done
	cxsh "journalctl -u docmail.service -o cat --no-pager | grep -- 'job=$2-0000 '"
	# the line carries its priority: journald stored it as info (6)
	cxsh "journalctl -u docmail.service -p info..info -o cat --no-pager | grep -q -- 'job=$2-0000 status=sent'" \
		|| fail "the sent line is not at priority info"
}

s_backlog() {
	local d=$JOBS/backlog
	cx python3 /systest/jobs.py make "$d" BL 150 || return 1
	cx python3 /systest/jobs.py make "$d" LATE 20 || return 1
	cx systemctl stop docmail.path
	upload "$d" rename BL || return 1
	cx systemctl start docmail.path
	wait_for 20 cx systemctl is-active -q docmail.service || fail "no run started for the backlog" || return 1
	upload "$d" rename LATE || return 1
	local busy; busy=$(cx systemctl is-active docmail.service)
	echo "20 new jobs uploaded; docmail.service afterwards: $busy"
	delivered 120 "$d" || fail "not every job of backlog + new arrived" || return 1
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail.service" || fail "run does not end"
	local left; left=$(cx ls -A /var/spool/docmail/incoming | wc -l)
	echo "drop after the run: $left entries"
	[ "$left" = 0 ] || fail "drop not empty: $(cx ls -A /var/spool/docmail/incoming | head)" || return 1
	units_healthy || fail "a unit failed"
}

invocations_since() { # distinct invocations of docmail.service since $1 (epoch seconds)
	cxsh "journalctl -u docmail.service --since=@$1 -o export --no-pager | sed -n 's/^_\?\(SYSTEMD_\)\?INVOCATION_ID=//p' | sort -u | wc -l"
}

s_trickle() {
	local d=$JOBS/trickle t0
	cx python3 /systest/jobs.py make "$d" TR 400 2000 || return 1
	t0=$(cx date +%s)
	sleep 1
	cx python3 /systest/jobs.py trickle "$d" 20 15 $SFTP $DEST || fail "trickle upload" || return 1
	delivered 120 "$d" || fail "not every trickled job arrived" || return 1
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail.service"
	local runs; runs=$(invocations_since "$t0")
	echo "runs started by systemd for 400 jobs (200 at 20/s, 15 s pause, 200 at 20/s): $runs"
	cx python3 /systest/jobs.py check "$MAILDIR" "$d" | python3 -c '
import json,sys; d=json.load(sys.stdin)
print("latency from arrival (just before the manifest is renamed into the drop) to delivery (the message file in the Maildir): median %.3fs, p99 %.3fs, max %.3fs" % (d["latency_median"], d["latency_p99"], d["latency_max"]))'
	if cxsh "journalctl --no-pager -o cat | grep -E 'Start request repeated too quickly|Trigger limit hit|start-limit-hit|docmail.*Failed with result'"; then
		fail "start or trigger limit hit"; return 1
	fi
	units_healthy || fail "a unit failed"
}

s_permissions() {
	local out rc=0
	cx sh -c 'echo x >/root/probe.txt'
	# each command alone, so that one failure does not hide the next
	try() { # try EXPECT CMD: EXPECT = ok | denied
		out=$(cxsh "echo '$2' | $SFTP -b - $DEST 2>&1"); local r=$?
		if [ "$1" = denied ]; then
			# sftp's get globs first: a file it may not stat is reported "not found"
			if [ $r -ne 0 ] && printf '%s' "$out" | grep -q -i -e 'permission denied' -e 'not found'; then
				echo "denied as expected: $2  -> $(printf '%s' "$out" | grep -i -e 'permission denied' -e 'not found' | head -1)"
			else
				echo "NOT denied: $2 (exit $r): $out"; rc=1
			fi
		else
			[ $r -eq 0 ] && echo "allowed as expected: $2" || { echo "NOT allowed: $2 (exit $r): $out"; rc=1; }
		fi
	}
	try denied "ls /sent"
	try denied "ls /failed"
	try denied "ls /active"
	try denied "ls /deferred"
	cx test -f /var/spool/docmail/sent/UP-0000/manifest.xml || { echo "no sent/UP-0000/manifest.xml to probe"; rc=1; }
	try denied "get /sent/UP-0000/manifest.xml /tmp/x"
	try denied "put /root/probe.txt /probe.txt"
	try denied "put /root/probe.txt /sent/probe.txt"
	try denied "put /root/probe.txt /failed/probe.txt"
	try denied "mkdir /evil"
	try denied "rename /incoming /evil"
	try ok "put /root/probe.txt /incoming/.probe.part"
	try ok "rm /incoming/.probe.part"
	local world; world=$(cx find /var/spool/docmail -perm -o=r)
	[ -z "$world" ] && echo "nothing in the spool is world-readable" || { echo "world-readable: $world"; rc=1; }
	return $rc
}

s_receipts() {
	local n
	n=$(cxsh "echo 'ls -1 /receipts' | $SFTP -b - $DEST 2>&1 | grep -c 'UP-0000.xml'")
	[ "$n" = 1 ] || fail "no receipt UP-0000.xml visible to the uploader" || return 1
	cxsh "echo 'get /receipts/UP-0000.xml /tmp/r.xml' | $SFTP -b - $DEST >/dev/null" || fail "uploader cannot read its receipt" || return 1
	cxsh 'cat /tmp/r.xml'; echo
	cxsh "echo 'rm /receipts/UP-0000.xml' | $SFTP -b - $DEST >/dev/null" || fail "uploader cannot delete its receipt" || return 1
	cx test ! -e /var/spool/docmail/receipts/UP-0000.xml || fail "receipt still there"
	echo "receipt fetched and deleted over SFTP"
}

s_defer_retry() {
	local d=$JOBS/defer n
	cx python3 /systest/jobs.py make "$d" DF 3 || return 1
	cx systemctl stop postfix
	upload "$d" rename || return 1
	wait_for 60 bash -c "[ \$(nsenter -t $LEADER -a ls /var/spool/docmail/deferred | wc -l) -ge 3 ]" \
		|| fail "jobs not deferred: deferred/ has $(cx ls /var/spool/docmail/deferred)" || return 1
	echo "postfix stopped: deferred/ = $(cx ls /var/spool/docmail/deferred | tr '\n' ' ')"
	n=$(journal_lines DF-0000 deferred); echo "journal: $n deferred line(s) for DF-0000"
	[ "${n:-0}" -ge 1 ] || fail "no 'status=deferred' journal line" || return 1
	cxsh "journalctl -u docmail.service -p warning..warning -o cat --no-pager | grep -q -- 'job=DF-0000 status=deferred'" \
		|| fail "the deferred line is not at priority warning" || return 1
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail.service"
	units_healthy || return 1
	cx systemctl start postfix
	local t0; t0=$(cx date +%s)
	delivered 90 "$d" || fail "deferred jobs did not arrive after postfix came back" || return 1
	echo "postfix started: delivered after $(( $(cx date +%s) - t0 ))s; docmail-retry.path armed the timer $(cxsh "journalctl -u docmail-retry.timer --no-pager -o cat | grep -c '^Started'") time(s)"
	wait_for 30 bash -c "[ -z \"\$(nsenter -t $LEADER -a ls -A /var/spool/docmail/deferred)\" ]" || fail "deferred/ not empty" || return 1
	# idle again: nothing armed, nothing runs
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail-retry.timer" || fail "docmail-retry.timer still armed with nothing deferred" || return 1
	echo "nothing deferred: docmail-retry.path $(cx systemctl show -p SubState --value docmail-retry.path), docmail-retry.timer $(cx systemctl is-active docmail-retry.timer)"
}

s_check() {
	local rc
	cx systemd-run --wait --pipe --quiet --collect -p User=docmail docmail check; rc=$?
	echo "systemd-run --wait --pipe docmail check: exit $rc"
	[ $rc -eq 0 ] || fail "check of the working configuration: exit $rc (want 0)" || return 1
	cxsh 'sed "s/^timeout = .*/timeout = \"10s\"\nspeed = \"fast\"/" /etc/docmail/docmail.toml >/etc/docmail/broken.toml; chmod 644 /etc/docmail/broken.toml'
	cx systemd-run --wait --pipe --quiet --collect -p User=docmail docmail check --config /etc/docmail/broken.toml; rc=$?
	echo "systemd-run --wait --pipe docmail check --config broken.toml (unknown key transport.speed): exit $rc"
	cx rm -f /etc/docmail/broken.toml
	[ $rc -eq 78 ] || fail "check of a broken configuration: exit $rc (want 78)"
	[ "$(cx systemctl is-system-running)" != degraded ] || { cx systemctl --failed --no-pager; fail "system degraded"; }
}

s_upgrade() {
	local d=$JOBS/upgrade inv1 inv2 active_during before mid n=40
	cx python3 /systest/jobs.py make "$d" UG $n 200000 || return 1
	# a slow relay (1 s per recipient), so that the backlog outlasts the upgrade
	cxsh 'postconf -e "smtpd_recipient_restrictions = sleep 1, permit_mynetworks, reject_unauth_destination" && postfix reload' >/dev/null 2>&1
	cx systemctl stop docmail.path
	upload "$d" rename || return 1
	cx systemctl start docmail.path
	wait_for 20 cx systemctl is-active -q docmail.service || fail "no run started for the backlog" || return 1
	sleep 3
	inv1=$(cx systemctl show -p InvocationID --value docmail.service)
	count() { cx python3 /systest/jobs.py check "$MAILDIR" "$d" | python3 -c 'import json,sys; print(json.load(sys.stdin)["delivered"])'; }
	before=$(count)
	echo "run $inv1 busy with the backlog ($before/$n delivered); installing $VERSION+systest1"
	cxsh 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q /share/docmail_N1.deb 2>&1 | tail -2' || return 1
	inv2=$(cx systemctl show -p InvocationID --value docmail.service)
	active_during=$(cx systemctl is-active docmail.service)
	mid=$(count)
	echo "after the upgrade: docmail.service $active_during, invocation ${inv2:-none} ($mid/$n delivered), version $(cx dpkg-query -W -f='${Version}' docmail)"
	[ "$(cx dpkg-query -W -f='${Version}' docmail)" = "$VERSION+systest1" ] || fail "not upgraded" || return 1
	[ "$active_during" = active ] && [ "$inv2" = "$inv1" ] || fail "the run did not go on through the upgrade" || return 1
	[ "$mid" -lt $n ] || fail "the backlog was done before the upgrade finished: nothing shown" || return 1
	delivered 120 "$d" || fail "not every job arrived exactly once" || return 1
	cxsh 'postconf -e "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination" && postfix reload' >/dev/null 2>&1
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail.service"
	if cxsh "journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID=$inv1 + INVOCATION_ID=$inv1 | grep -i -E 'stopping|killing|sigterm|watchdog|failed'"; then
		fail "the run was stopped or killed"; return 1
	fi
	echo "run $inv1 went on through the upgrade and ended by itself; every job arrived exactly once"
	units_healthy
}

s_final() {
	local out
	out=$(cx python3 /systest/jobs.py check "$MAILDIR" $(cx sh -c "ls -d $JOBS/*"))
	echo "all jobs of this test: $out"
	python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(not(d["delivered"]==d["expected"] and d["duplicate_count"]==0))' "$out" \
		|| fail "lost or duplicated jobs" || return 1
	# one journal line per job outcome: every job has exactly one "status=sent" line
	cxsh "journalctl -u docmail.service -u docmail@second.service -o cat --no-pager | python3 /systest/jobs.py journal $JOBS/*" \
		|| fail "jobs without exactly one sent line in the journal" || return 1
	local a; a=$(cx sh -c 'for s in incoming active deferred failed; do printf "%s=%s " $s $(ls -A /var/spool/docmail/$s | wc -l); done')
	echo "spool: $a"
	[ "$a" = "incoming=0 active=0 deferred=0 failed=0 " ] || fail "spool not clean"
}

s_remove_purge() {
	# one failed job (invalid manifest) and one deferred job (relay away) that must survive purge
	cxsh 'printf "%s\n" "<?xml version=\"1.0\"?>" "<job xmlns=\"urn:docmail:job:1\" id=\"BAD-1\"><to>jane@example.net</to><bogus/></job>" >/root/BAD-1.xml'
	cxsh "echo 'put /root/BAD-1.xml BAD-1.xml' | $SFTP -b - $DEST >/dev/null" || return 1
	wait_for 30 cx test -e /var/spool/docmail/failed/BAD-1 || fail "invalid job not in failed/" || return 1
	local d=$JOBS/purge
	cx python3 /systest/jobs.py make "$d" KEEP 1 || return 1
	cx systemctl stop postfix
	upload "$d" rename || return 1
	wait_for 30 cx test -e /var/spool/docmail/deferred/KEEP-0000 || fail "job not deferred" || return 1
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail.service"
	cxsh 'DEBIAN_FRONTEND=noninteractive apt-get remove -y -q docmail 2>&1 | tail -1' || return 1
	local u st
	for u in docmail.path docmail-retry.path docmail-retry.timer docmail.service; do
		st=$(cx systemctl is-active $u); echo "after remove: $u $st"
		[ "$st" != active ] || fail "$u still active after remove" || return 1
	done
	if cx sh -c 'ls /etc/systemd/system/*.wants/ | grep docmail'; then fail "enablement links left after remove"; return 1; fi
	echo "after remove: no enablement links; config kept: $(cx ls /etc/docmail | tr '\n' ' ')"
	cxsh 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -q docmail 2>&1 | grep -i -e docmail: -e Purging | tail -2'
	cx test ! -e /etc/docmail || fail "/etc/docmail left after purge" || return 1
	cx test -e /var/spool/docmail/failed/BAD-1/manifest.xml || fail "purge deleted the failed job" || return 1
	cxsh 'test -e /var/spool/docmail/deferred/KEEP-0000/manifest.xml || test -e /var/spool/docmail/active/KEEP-0000/manifest.xml' || fail "purge deleted the deferred job" || return 1
	echo "after purge: /etc/docmail gone; kept: $(cx sh -c 'cd /var/spool/docmail && ls -d */* | tr "\n" " "')"
	cx systemctl start postfix
}

s_example_script() {
	# the back office's side as shipped: /usr/share/doc/docmail/examples/upload-example.sh
	local d=$JOBS/example
	cx python3 /systest/jobs.py make "$d" EX 2 30000 || return 1
	cxsh "mkdir -p /root/outbox && cp $d/EX-*.pdf $d/EX-*.xml /root/outbox/ &&
		printf 'Host 127.0.0.1\n\tStrictHostKeyChecking no\n\tUserKnownHostsFile /dev/null\n\tLogLevel ERROR\n' >/root/.ssh/config" || return 1
	cxsh "cd /root && OUTBOX=/root/outbox RECEIPTS=/root/receipts SSH_KEY=/root/.ssh/backoffice \
		sh /usr/share/doc/docmail/examples/upload-example.sh $DEST" || fail "upload-example.sh (upload) failed" || return 1
	delivered 60 "$d" || fail "jobs of the example script did not arrive" || return 1
	wait_for 20 cx test -e /var/spool/docmail/receipts/EX-0001.xml || fail "no receipt for EX-0001" || return 1
	cxsh "cd /root && OUTBOX=/root/outbox RECEIPTS=/root/receipts SSH_KEY=/root/.ssh/backoffice \
		sh /usr/share/doc/docmail/examples/upload-example.sh $DEST" || fail "upload-example.sh (receipts) failed" || return 1
	echo "fetched receipts: $(cx ls /root/receipts | tr '\n' ' ')"
	cx test -s /root/receipts/EX-0000.xml && cx test -s /root/receipts/EX-0001.xml || fail "receipts not fetched" || return 1
	cx test ! -e /var/spool/docmail/receipts/EX-0000.xml || fail "receipt not deleted on the server" || return 1
	echo "upload-example.sh: 2 jobs uploaded (temporary names, rename, manifest last), receipts fetched and deleted"
}

s_instance() {
	# a second drop per docmail.toml(5) "SEVERAL DROPS": /etc/docmail/second.toml, /var/spool/docmail/second
	local d=$JOBS/second
	cx python3 /systest/jobs.py make "$d" SEC 2 || return 1
	cxsh 'set -e
		sed "s|^spool = .*|spool = \"/var/spool/docmail/second\"|" /etc/docmail/docmail.toml >/etc/docmail/second.toml
		sed "s|/var/spool/docmail|/var/spool/docmail/second|" \
			/usr/lib/tmpfiles.d/docmail.conf >/etc/tmpfiles.d/docmail-second.conf
		systemd-tmpfiles --create docmail-second.conf
		systemctl enable --now docmail@second.path 2>&1' || return 1
	cx systemctl is-active docmail@second.path docmail-retry@second.path || fail "instance units not active" || return 1
	cxsh "REMOTE_DIR=/second/incoming python3 /systest/jobs.py batch $d rename >$d/batch && $SFTP -b $d/batch $DEST >/dev/null" \
		|| fail "upload into /second/incoming" || return 1
	delivered 60 "$d" || fail "jobs of the second drop did not arrive" || return 1
	local n; n=$(cxsh "journalctl -u docmail@second.service -o cat --no-pager | grep -c 'status=sent'")
	echo "journalctl -u docmail@second.service: $n sent lines"
	[ "$n" = 2 ] || fail "want 2 sent lines from docmail@second.service" || return 1
	cx systemctl disable --now docmail@second.path docmail-retry@second.path 2>&1
}

s_slow_put() {
	# in-place put of a manifest written slowly (512-byte writes at 1 KB/s for ~6 s): the drop
	# shows a half-written *.xml all that time, and must neither trip a limit nor lose the job
	local d=$JOBS/slow t0 runs
	cx python3 /systest/jobs.py make "$d" SLOW 1 || return 1
	cxsh "python3 - $d/SLOW-0000.xml <<'PY'
import sys
p = sys.argv[1]
t = open(p).read().replace('<job ', '<!-- ' + 'x' * 6000 + ' -->\n<job ', 1)
open(p, 'w').write(t)
PY" || return 1
	t0=$(cx date +%s)
	sleep 1
	cxsh "printf 'put $d/SLOW-0000.pdf SLOW-0000.pdf\n' | $SFTP -b - $DEST >/dev/null" || return 1
	cxsh "printf 'put $d/SLOW-0000.xml SLOW-0000.xml\n' | $SFTP -B 512 -l 8 -b - $DEST >/dev/null" || fail "slow put" || return 1
	delivered 60 "$d" || fail "the slowly written job did not arrive" || return 1
	wait_for 30 bash -c "! nsenter -t $LEADER -a systemctl is-active -q docmail.service"
	runs=$(invocations_since "$t0")
	echo "runs started while the manifest was written and delivered: $runs"
	if cxsh "journalctl --no-pager -o cat --since=@$t0 | grep -E 'Start request repeated too quickly|Trigger limit hit|start-limit-hit|docmail.*Failed with result'"; then
		fail "start or trigger limit hit"; return 1
	fi
	units_healthy || fail "a unit failed"
}

scenario "install the .deb with apt (enables nothing; users, spool modes)" s_install
[ $FAILED -eq 0 ] || die "installation failed"
scenario "setup: postfix relay, docmail over SMTP, chrooted SFTP account, enable --now docmail.path" s_setup
[ $FAILED -eq 0 ] || die "setup failed"
scenario "systemd-analyze verify of every installed unit" s_verify
scenario "systemd-analyze security docmail.service <= 1.5" s_security
scenario "lintian: no errors, no warnings" s_lintian
scenario "SFTP upload with temporary names + rename: mail, attachment, journal" s_upload rename UP
scenario "SFTP upload with plain in-place put: mail, attachment, journal" s_upload put PUT
scenario "in-place put of a slowly written manifest: no limit hit, delivered once" s_slow_put
scenario "uploader cannot read sent/ failed/ nor write outside the drop" s_permissions
scenario "uploader reads and deletes receipts" s_receipts
scenario "the packaged upload-example.sh: upload, then fetch and delete receipts" s_example_script
scenario "a second drop: docmail@second.path / docmail@second.service" s_instance
scenario "new jobs during a busy backlog run; drop empty, units healthy" s_backlog
scenario "trickle: 200 at 20/s, 15 s pause, 200 at 20/s" s_trickle
scenario "postfix stopped: deferred; started + retry timer: delivered" s_defer_retry
scenario "systemd-run --wait --pipe docmail check: 0 configured, 78 broken" s_check
scenario "upgrade N -> N+1 during a backlog: the run goes on, every job once" s_upgrade
scenario "every job of the test delivered exactly once; spool clean" s_final
scenario "remove stops and disables the units; purge removes /etc/docmail, keeps undelivered jobs" s_remove_purge

echo
echo "docmail system test summary ($((SECONDS - T_START))s):"
printf '  %s\n' "${RESULTS[@]}"
echo "$PASSED passed, $FAILED failed"
[ $FAILED -eq 0 ]
