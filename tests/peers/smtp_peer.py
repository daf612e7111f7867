#!/usr/bin/python3
"""A small, real SMTP server for docmail's integration tests (aiosmtpd).

It stores every accepted message byte for byte as OUT/msgs/NNNNNN.eml with a
sidecar OUT/msgs/NNNNNN.env (envelope sender and recipients, TLS, AUTH user,
connection number, arrival time). Every TCP connection appends a line to
OUT/events.log, as does every AUTH attempt, MAIL, RCPT and DATA, so a test can
count connections and sessions.

Behaviour is chosen on the command line: STARTTLS with a certificate, AUTH
(PLAIN and LOGIN) with one user and password, 550 or 451 for RCPT addresses
matching a regular expression.

On start it prints one line `READY port=N` on stdout; it runs until killed.
"""

import argparse
import asyncio
import os
import re
import socket
import ssl
import sys
import threading
import time

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--require-starttls", action="store_true")
    p.add_argument("--auth-user")
    p.add_argument("--auth-password")
    p.add_argument("--reject-rcpt", help="regex: answer RCPT with 550")
    p.add_argument("--tempfail-rcpt", help="regex: answer RCPT with 451")
    p.add_argument("--also-ipv6", action="store_true",
                   help="also listen on ::1 with the same port (for localhost)")
    return p.parse_args()


class Recorder:
    def __init__(self, out):
        self.out = out
        self.msgdir = os.path.join(out, "msgs")
        os.makedirs(self.msgdir, exist_ok=True)
        self.lock = threading.Lock()
        self.seq = 0
        self.conn_seq = 0
        self.events = open(os.path.join(out, "events.log"), "a", buffering=1)

    def event(self, conn, what):
        with self.lock:
            self.events.write(f"{time.time():.6f} conn={conn} {what}\n")
            self.events.flush()

    def new_conn(self):
        with self.lock:
            self.conn_seq += 1
            return self.conn_seq

    def store(self, meta, content):
        with self.lock:
            self.seq += 1
            n = self.seq
        base = os.path.join(self.msgdir, f"{n:06d}")
        # Sidecar: simple key=value lines (one rcpt_to= line per recipient).
        lines = [f"mail_from={meta['mail_from']}"]
        lines += [f"rcpt_to={r}" for r in meta["rcpt_tos"]]
        lines += [f"tls={int(meta['tls'])}", f"auth_user={meta['auth_user'] or ''}",
                  f"conn={meta['conn']}", f"time={meta['time']:.6f}"]
        with open(base + ".env.tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.rename(base + ".env.tmp", base + ".env")
        # The .eml appears last and atomically: a test that sees it sees both.
        with open(base + ".eml.tmp", "wb") as f:
            f.write(content)
        os.rename(base + ".eml.tmp", base + ".eml")
        return n


class Handler:
    def __init__(self, args, rec):
        self.args = args
        self.rec = rec
        self.reject = re.compile(args.reject_rcpt) if args.reject_rcpt else None
        self.tempfail = re.compile(args.tempfail_rcpt) if args.tempfail_rcpt else None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.rec.event(server.conn_no, f"EHLO {hostname} tls={session.ssl is not None}")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.rec.event(server.conn_no, f"MAIL {address}")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reject and self.reject.search(address):
            self.rec.event(server.conn_no, f"RCPT {address} 550")
            return (f"550 5.1.1 <{address}>: Recipient address rejected: "
                    "no such mailbox at test peer")
        if self.tempfail and self.tempfail.search(address):
            self.rec.event(server.conn_no, f"RCPT {address} 451")
            return f"451 4.3.0 <{address}>: test peer is busy, try later"
        self.rec.event(server.conn_no, f"RCPT {address}")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "tls": session.ssl is not None,
            "auth_user": server.auth_user,
            "conn": server.conn_no,
            "time": time.time(),
        }
        n = self.rec.store(meta, envelope.original_content)
        self.rec.event(server.conn_no, f"DATA stored={n:06d}")
        return f"250 2.0.0 Ok: queued as TEST{n:06d}"


class PeerSMTP(SMTP):
    def __init__(self, handler, rec, **kw):
        super().__init__(handler, **kw)
        self.rec = rec
        self.conn_no = rec.new_conn()
        self.auth_user = None
        rec.event(self.conn_no, "CONNECT")


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    rec = Recorder(args.out)
    handler = Handler(args, rec)

    tls_context = None
    if args.tls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.tls_cert, args.tls_key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = False
        user = None
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            pw = auth_data.password.decode("utf-8", "replace")
            ok = user == args.auth_user and pw == args.auth_password
        rec.event(server.conn_no, f"AUTH {mechanism} user={user} ok={ok}")
        if ok:
            server.auth_user = user
        return AuthResult(success=ok, handled=False)

    kw = dict(
        hostname="peer.test",
        data_size_limit=200 * 1024 * 1024,
        enable_SMTPUTF8=True,
        decode_data=False,
        tls_context=tls_context,
        require_starttls=bool(tls_context and args.require_starttls),
        timeout=60,
    )
    if args.auth_user is not None:
        kw.update(authenticator=authenticator, auth_required=True,
                  auth_require_tls=tls_context is not None)

    def factory():
        return PeerSMTP(handler, rec, **kw)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(factory, host=args.host, port=args.port,
                           reuse_address=True))
    port = server.sockets[0].getsockname()[1]
    if args.also_ipv6:
        try:
            loop.run_until_complete(
                loop.create_server(factory, host="::1", port=port,
                                   family=socket.AF_INET6, reuse_address=True))
        except OSError:
            pass
    sys.stdout.write(f"READY port={port}\n")
    sys.stdout.flush()
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
