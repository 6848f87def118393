#!/usr/bin/python3
"""A real SMTP server for integration tests (Debian's python3-aiosmtpd).

Usage: /usr/bin/python3 smtp_sink.py --dir D [--port P] [--fail] [--auth user:pass]
           [--tls starttls|implicit --tls-cert CERT.pem --tls-key KEY.pem]

Every accepted message is written to D as NNNNNN.json:
    {"mail_from": "...", "rcpt_tos": ["..."], "data": "<raw RFC 5322 message>"}
(written to a temporary name first, then renamed, so readers never see a
partial file). Once listening, prints "READY <port>" on stdout; with
--port 0 (the default) the OS picks the port. --fail answers 554 to every
DATA. --auth requires SMTP AUTH (PLAIN/LOGIN, allowed without TLS) with
the given credentials. --tls starttls offers (and requires) STARTTLS;
--tls implicit speaks TLS from the first byte (SMTPS). The server exits
when its stdin is closed, so it never outlives the test process that
started it.
"""

import argparse
import asyncio
import itertools
import json
import logging
import os
import ssl
import sys
import threading
import warnings

from aiosmtpd.smtp import SMTP, AuthResult


class Sink:
    def __init__(self, directory, fail):
        self.directory = directory
        self.fail = fail
        self.seq = itertools.count(1)

    async def handle_DATA(self, server, session, envelope):
        if self.fail:
            return "554 5.7.1 Message rejected by test sink"
        n = next(self.seq)
        content = envelope.content
        if isinstance(content, bytes):
            content = content.decode("utf-8", errors="replace")
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": content,
        }
        final = os.path.join(self.directory, "%06d.json" % n)
        tmp = final + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, final)
        return "250 2.0.0 OK: queued as %d" % n


def authenticator_for(user, password):
    def authenticate(server, session, envelope, mechanism, auth_data):
        login = getattr(auth_data, "login", None)
        secret = getattr(auth_data, "password", None)
        if isinstance(login, bytes):
            login = login.decode("utf-8", errors="replace")
        if isinstance(secret, bytes):
            secret = secret.decode("utf-8", errors="replace")
        ok = login == user and secret == password
        # handled=False: let aiosmtpd answer 535 on failure.
        return AuthResult(success=ok, handled=False)

    return authenticate


def exit_when_stdin_closes():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--auth", metavar="USER:PASS")
    parser.add_argument("--tls", choices=["starttls", "implicit"])
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()

    # Plain AUTH without TLS is deliberate here; keep stderr for real errors.
    warnings.filterwarnings("ignore", module="aiosmtpd")
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    os.makedirs(args.dir, exist_ok=True)
    handler = Sink(args.dir, args.fail)
    options = {"hostname": "sink.test", "enable_SMTPUTF8": True}
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep:
            parser.error("--auth wants user:pass")
        options.update(
            auth_required=True,
            auth_require_tls=False,
            authenticator=authenticator_for(user, password),
        )

    server_ssl = None
    if args.tls:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls wants --tls-cert and --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls == "starttls":
            options.update(tls_context=context, require_starttls=True)
        else:
            server_ssl = context

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, **options),
        host="127.0.0.1",
        port=args.port,
        ssl=server_ssl,
    )
    port = server.sockets[0].getsockname()[1]
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    print("READY %d" % port, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
