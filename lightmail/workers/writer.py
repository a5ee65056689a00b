"""The writer process's entry point: ``python -m lightmail.workers.writer``.

Started by the main process's WriterLink (lightmail.storage.writerlink) with one end
of a socket pair; it wires its storage as every LightMail process does
(lightmail.wiring, role WRITER) and runs the loop of lightmail.storage.writer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LightMail's writer process")
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-stdin", action="store_true",
                        help="the config's text comes on standard input; --config is "
                             "the file it was read from")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--listen", help="a Unix socket for the workers to connect to")
    args = parser.parse_args(argv)
    # The main process decides when this one ends (by closing the socket, once what
    # it sent is answered); a Ctrl-C or SIGTERM to the process group is for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Nor is SIGUSR1 (logrotate, sent to the group by some set-ups): this process has
    # no log file of its own to reopen, and SIGUSR1's default would end it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)        # a reload is for the server
    # What goes wrong here (an operation that fails for an undeclared reason, say)
    # reaches the main process's standard error, which this process shares.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    from lightmail.config import load_config, parse_config
    from lightmail.storage.writer import serve
    from lightmail.wiring import wire_writer
    if args.config_stdin:
        config = parse_config(sys.stdin.buffer.read().decode("utf-8"), args.config)
    else:
        config = load_config(args.config)
    sock = socket.socket(fileno=args.fd)
    listener = None
    if args.listen:
        # In a directory of the main process's own (mode 0700): only this user's
        # processes can reach it, as with the socket pair.  The socket itself is
        # 0600 from its making (the umask of the bind), not from a chmod after it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.listen)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)
        try:
            listener.bind(args.listen)
        finally:
            os.umask(umask)
        os.chmod(args.listen, 0o600)
        listener.listen(64)
    storage = wire_writer(config)
    try:
        serve(sock, storage.db, storage.blobs, storage.writes, listener)
    finally:
        storage.db.stop()
        if args.listen:
            with contextlib.suppress(OSError):
                os.unlink(args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
