#!/usr/bin/python3
"""An aiosmtpd server that misbehaves on purpose, for docmail's fault tests.

Usage: fault_smtpd.py --out DIR --mode MODE [--delay SECONDS] [--faults N]

It prints `READY port=N` once listening on 127.0.0.1 (kernel-chosen port) and runs until killed.
Every connection and command is appended to DIR/events.log; every accepted message is stored as
DIR/msgs/NNNNNN.eml (atomically, the .eml appears last).

Modes (the reply texts carry the marker "fault-peer" so tests can find them in docmail's reasons):
  ok                     accept everything
  mail421 mail451 mail554         answer MAIL FROM with that code (421 also closes the connection)
  rcpt421 rcpt451 rcpt452 rcpt554 answer RCPT TO with that code
  datacmd451 datacmd554           answer the DATA command itself (instead of 354)
  data421 data451 data452 data554 take the whole message, then answer the final dot with that code
  drop-data              answer DATA with 354, read a little of the message, then close the connection
  banner421 banner554    greet with that code instead of 220 (and close the connection)
  no-accept              a listening socket whose accept queue is full: connects never complete
  stall-banner           accept the TCP connection, never send the greeting
  stall-mail             never answer MAIL FROM
  stall-data             take the whole message, never answer the final dot
  stall-reading          answer DATA with 354, then stop reading: the client's writes block
  slow                   answer every command (and the greeting) after --delay seconds
"""

import argparse
import asyncio
import os
import sys
import threading
import time

from aiosmtpd.smtp import SMTP, MISSING


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="ok")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--faults", type=int, default=-1,
                   help="misbehave only this many times, then behave (default: always)")
    return p.parse_args()


ARGS = parse_args()
MODE = ARGS.mode
OUT = ARGS.out
os.makedirs(os.path.join(OUT, "msgs"), exist_ok=True)
LOCK = threading.Lock()
EVENTS = open(os.path.join(OUT, "events.log"), "a", buffering=1)
COUNTERS = {"conn": 0, "msg": 0}

REPLIES = {
    "421": "421 4.3.2 fault-peer: service shutting down ({stage})",
    "451": "451 4.3.0 fault-peer: local error in processing ({stage})",
    "452": "452 4.3.1 fault-peer: insufficient system storage ({stage})",
    "554": "554 5.7.1 fault-peer: transaction failed, message refused ({stage})",
}


def event(conn, what):
    with LOCK:
        EVENTS.write(f"{time.time():.6f} conn={conn} {what}\n")
        EVENTS.flush()


def fault(stage):
    """The reply code this mode gives at `stage` (mail, rcpt, datacmd, data), or None."""
    for code in REPLIES:
        if MODE == f"{stage}{code}":
            with LOCK:
                if ARGS.faults == 0:
                    return None
                ARGS.faults -= 1
            return code
    return None


async def stall(server, stage):
    event(server.conn_no, f"STALL {stage}")
    await asyncio.sleep(3600)


class Handler:
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        event(server.conn_no, f"MAIL {address}")
        if MODE == "stall-mail":
            await stall(server, "mail")
        code = fault("mail")
        if code:
            return await server.refuse(code, "MAIL")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        event(server.conn_no, f"RCPT {address}")
        code = fault("rcpt")
        if code:
            return await server.refuse(code, "RCPT")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        event(server.conn_no, f"DATA {len(envelope.original_content)} bytes")
        if MODE == "stall-data":
            await stall(server, "data")
        code = fault("data")
        if code:
            return await server.refuse(code, "end of DATA")
        with LOCK:
            COUNTERS["msg"] += 1
            n = COUNTERS["msg"]
        base = os.path.join(OUT, "msgs", f"{n:06d}")
        with open(base + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(base + ".tmp", base + ".eml")
        event(server.conn_no, f"STORED {n:06d}")
        return f"250 2.0.0 Ok: queued as FAULT{n:06d}"


class FaultSMTP(SMTP):
    def __init__(self, handler, **kw):
        super().__init__(handler, **kw)
        with LOCK:
            COUNTERS["conn"] += 1
            self.conn_no = COUNTERS["conn"]
        event(self.conn_no, "CONNECT")

    async def refuse(self, code, stage):
        reply = REPLIES[code].format(stage=stage)
        event(self.conn_no, f"REPLY {reply}")
        if code == "421":
            # RFC 5321: 421 means the server closes the channel.
            await self.push(reply)
            self.transport.close()
            return MISSING
        return reply

    async def push(self, status):
        if MODE == "slow" and ARGS.delay > 0:
            await asyncio.sleep(ARGS.delay)
        if self.transport is None or self.transport.is_closing():
            return
        await super().push(status)

    async def _handle_client(self):
        if MODE == "stall-banner":
            await stall(self, "banner")
        code = fault("banner")
        if code:
            reply = REPLIES[code].format(stage="greeting")
            event(self.conn_no, f"REPLY {reply}")
            await self.push(reply)
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_DATA(self, arg):
        code = fault("datacmd")
        if code and self.envelope.rcpt_tos:
            event(self.conn_no, "DATA command")
            await self.push(await self.refuse(code, "DATA command"))
            return
        if MODE == "stall-reading" and self.envelope.rcpt_tos:
            event(self.conn_no, "DATA command")
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self.transport.pause_reading()
            await stall(self, "reading the message")
        if MODE == "drop-data" and self.envelope.rcpt_tos:
            event(self.conn_no, "DATA command")
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            got = 0
            while got < 3:
                await self._reader.readuntil(b"\r\n")
                got += 1
            event(self.conn_no, "DROP in the middle of DATA")
            self.transport.abort()
            return
        await super().smtp_DATA(arg)


def no_accept():
    """Listen with a backlog of 0 and fill the queue ourselves: the kernel then drops further SYNs,
    so a client's connect() neither succeeds nor fails until its own timeout."""
    import socket
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.3)
    event(0, f"NO-ACCEPT listening on {port} with a full queue")
    sys.stdout.write(f"READY port={port}\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)


def main():
    if MODE == "no-accept":
        return no_accept()
    kw = dict(hostname="fault.test", decode_data=False, enable_SMTPUTF8=True,
              data_size_limit=100 * 1024 * 1024, timeout=3600)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(
        lambda: FaultSMTP(Handler(), **kw), host="127.0.0.1", port=0))
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY port={port}\n")
    sys.stdout.flush()
    loop.run_forever()


if __name__ == "__main__":
    main()
