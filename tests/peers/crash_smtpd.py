#!/usr/bin/python3
"""A fast aiosmtpd sink for docmail's crash-injection test.

Usage: crash_smtpd.py --out DIR

Prints `READY port=N` once listening on 127.0.0.1 (kernel-chosen port); runs until killed. It accepts
every message and appends one line per event to DIR/log:

  CONNECT <conn> <unix time>
  MSG <conn> <unix time> <Message-ID>

written and flushed before the 250 reply goes out, so a message the client may believe accepted is
always in the log. RCPT to an address with "+reject@" is answered 554, with "+busy@" 451.
The test maps connections to the docmail run that opened them (a connection is
opened while its run is alive) to tell which run a copy belongs to.
"""

import argparse
import asyncio
import os
import re
import sys
import time

from aiosmtpd.smtp import SMTP

MSGID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log"), "a", buffering=1)
    state = {"conn": 0}

    def write(line):
        log.write(line + "\n")
        log.flush()

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            # Recipients can ask for a fault: "+reject@" gets 554, "+busy@" gets 451.
            if "+reject@" in address:
                return "554 5.7.1 crash-peer: recipient refused"
            if "+busy@" in address:
                return "451 4.3.0 crash-peer: mailbox busy, try later"
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            head = envelope.original_content.split(b"\r\n\r\n", 1)[0]
            m = MSGID.search(head)
            mid = m.group(1).decode("ascii", "replace") if m else "<none>"
            write(f"MSG {server.conn_no} {time.time():.6f} {mid}")
            return "250 2.0.0 Ok: queued"

    class CrashSMTP(SMTP):
        def __init__(self, handler, **kw):
            super().__init__(handler, **kw)
            state["conn"] += 1
            self.conn_no = state["conn"]
            write(f"CONNECT {self.conn_no} {time.time():.6f}")

    kw = dict(hostname="crash.test", decode_data=False, enable_SMTPUTF8=True, timeout=600)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(
        lambda: CrashSMTP(Handler(), **kw), host="127.0.0.1", port=0, backlog=128))
    sys.stdout.write(f"READY port={server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    loop.run_forever()


if __name__ == "__main__":
    main()
