#!/usr/bin/env python3
"""Helpers for the docmail system test, run inside the container as root.

  jobs.py make DIR PREFIX COUNT [SIZE]      documents + manifests into DIR, expected.json
  jobs.py batch DIR MODE [PREFIX]           print an sftp batch (MODE: rename | put), manifests last
  jobs.py trickle DIR RATE PAUSE SFTP...    upload DIR's jobs over one sftp session at RATE jobs/s,
                                            pausing PAUSE s halfway; writes DIR/marks (id, time)
  jobs.py check MAILDIR DIR...              match the Maildir against the jobs: JSON summary
  jobs.py journal DIR...                    stdin: docmail.service's journal; one sent line per job
"""
import email
import email.policy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time


def make(d, prefix, count, size=4096):
    os.makedirs(d, exist_ok=True)
    expected = {}
    path = os.path.join(d, "expected.json")
    if os.path.exists(path):
        expected = json.load(open(path))
    order = []
    for i in range(count):
        jid = f"{prefix}-{i:04d}"
        body = b"%PDF-1.4\n%docmail systest " + jid.encode() + b"\n" + os.urandom(size) + b"\n%%EOF\n"
        doc = f"{jid}.pdf"
        with open(os.path.join(d, doc), "wb") as f:
            f.write(body)
        sha = hashlib.sha256(body).hexdigest()
        manifest = f"""<?xml version="1.0" encoding="UTF-8"?>
<job xmlns="urn:docmail:job:1" id="{jid}">
  <to name="Jane Doe">jane.doe@example.net</to>
  <subject>systest {jid}</subject>
  <var name="customer_name">Jane Doe</var>
  <var name="invoice_number">{jid}</var>
  <attachment file="{doc}" name="Invoice {jid}.pdf" type="application/pdf" size="{len(body)}" sha256="{sha}"/>
</job>
"""
        with open(os.path.join(d, f"{jid}.xml"), "w") as f:
            f.write(manifest)
        expected[jid] = {"doc": doc, "sha256": sha, "size": len(body)}
        order.append(jid)
    json.dump(expected, open(path, "w"))
    with open(os.path.join(d, "order"), "a") as f:
        f.write("".join(j + "\n" for j in order))


def job_commands(d, jid, mode, mark=None):
    doc = f"{jid}.pdf"
    out = []
    remote = os.environ.get("REMOTE_DIR", "")  # default: the login directory (the drop)
    r = remote + "/" if remote else ""
    for name in (doc, f"{jid}.xml"):  # documents first, the manifest last
        src = os.path.join(d, name)
        if mode == "rename":
            out.append(f'put "{src}" "{r}.{name}.part"')
            if mark and name.endswith(".xml"):
                # arrival: the moment just before the manifest is renamed into the drop
                out.append(f"!echo {jid} $(date +%s.%N) >> {mark}")
            out.append(f'rename "{r}.{name}.part" "{r}{name}"')
        else:
            out.append(f'put "{src}" "{r}{name}"')
    return out


def ids(d, prefix=None):
    order = [l.strip() for l in open(os.path.join(d, "order")) if l.strip()]
    return [j for j in order if prefix is None or j.startswith(prefix + "-")]


def batch(d, mode, prefix=None):
    for jid in ids(d, prefix):
        print("\n".join(job_commands(d, jid, mode)))


def trickle(d, rate, pause, sftp):
    jobs = ids(d)
    mark = os.path.join(d, "marks")
    p = subprocess.Popen(sftp[:-1] + ["-b", "-", sftp[-1]], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    half = len(jobs) // 2
    t0 = time.monotonic()
    for i, jid in enumerate(jobs):
        due = t0 + i / rate + (pause if i >= half else 0)
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        p.stdin.write("\n".join(job_commands(d, jid, "rename", mark)) + "\n")
        p.stdin.flush()
    p.stdin.close()
    rc = p.wait()
    print(f"trickle: {len(jobs)} jobs in {time.monotonic() - t0:.1f}s, sftp exit {rc}")
    sys.exit(rc)


def check(maildir, dirs):
    expected = {}
    marks = {}
    for d in dirs:
        expected.update(json.load(open(os.path.join(d, "expected.json"))))
        m = os.path.join(d, "marks")
        if os.path.exists(m):
            for line in open(m):
                jid, t = line.split()
                marks[jid] = float(t)
    # parsing every message on every poll is slow: remember what each Maildir file held
    cache_path = os.path.join(os.path.dirname(maildir.rstrip("/")), ".systest-maildir-cache.json")
    try:
        cache = json.load(open(cache_path))
    except (OSError, ValueError):
        cache = {}
    seen = {}
    bad = []
    latency = []
    for sub in ("new", "cur"):
        sd = os.path.join(maildir, sub)
        if not os.path.isdir(sd):
            continue
        for name in os.listdir(sd):
            path = os.path.join(sd, name)
            entry = cache.get(name)
            if entry is None:
                with open(path, "rb") as f:
                    msg = email.message_from_binary_file(f, policy=email.policy.default)
                subject = str(msg.get("Subject", ""))
                jid = subject.split(" ", 1)[1] if subject.startswith("systest ") else None
                shas = {}
                if jid:
                    for part in msg.iter_attachments():
                        payload = part.get_payload(decode=True) or b""
                        shas[str(part.get_filename())] = hashlib.sha256(payload).hexdigest()
                entry = {"jid": jid, "shas": shas, "mtime": os.stat(path).st_mtime}
                cache[name] = entry
            jid = entry["jid"]
            if not jid:
                continue
            seen[jid] = seen.get(jid, 0) + 1
            exp = expected.get(jid)
            if exp is None:
                continue
            got = entry["shas"].get(f"Invoice {jid}.pdf")
            if got != exp["sha256"]:
                bad.append(f"{jid}: attachment sha256 {got} != {exp['sha256']}")
            if jid in marks:
                latency.append(entry["mtime"] - marks[jid])
    tmp = cache_path + ".tmp"
    json.dump(cache, open(tmp, "w"))
    os.replace(tmp, cache_path)
    missing = sorted(j for j in expected if j not in seen)
    dups = sorted(j for j, n in seen.items() if n > 1 and j in expected)
    out = {
        "expected": len(expected),
        "delivered": sum(1 for j in expected if j in seen),
        "missing": missing[:20],
        "missing_count": len(missing),
        "duplicates": dups[:20],
        "duplicate_count": len(dups),
        "bad_attachments": bad[:20],
        "bad_count": len(bad),
    }
    if latency:
        latency.sort()
        out["latency_median"] = round(statistics.median(latency), 3)
        out["latency_p99"] = round(latency[min(len(latency) - 1, int(len(latency) * 0.99))], 3)
        out["latency_max"] = round(latency[-1], 3)
    print(json.dumps(out))


def journal(dirs):
    """stdin: journal lines of docmail.service; each job must have exactly one status=sent line"""
    import collections
    import re
    sent = collections.Counter()
    for line in sys.stdin:
        m = re.search(r"job=(\S+) status=sent", line)
        if m:
            sent[m.group(1)] += 1
    ids = set()
    for d in dirs:
        ids.update(json.load(open(os.path.join(d, "expected.json"))))
    bad = sorted(j for j in ids if sent[j] != 1)
    print(f"journal: {len(ids)} jobs, {len(ids) - len(bad)} with exactly one status=sent line"
          + (f"; not: {bad[:10]}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make":
        make(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else 4096)
    elif cmd == "batch":
        batch(args[0], args[1], args[2] if len(args) > 2 else None)
    elif cmd == "trickle":
        trickle(args[0], float(args[1]), float(args[2]), args[3:])
    elif cmd == "journal":
        journal(args)
    elif cmd == "check":
        check(args[0], args[1:])
    else:
        sys.exit(__doc__)
