"""Listening ports for a namespace (the lab's target side, a benchmark's fixture): accept,
optionally greet, close; until stdin closes.

``python -m tests.support.lab_listen [--banner TEXT] 198.19.0.10:22 198.19.0.12:1-200`` prints
``ready`` once every port listens.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import sys


def parse(items: list[str]) -> list[tuple[str, int]]:
    pairs = []
    for item in items:
        address, _, ports = item.rpartition(":")
        first, _, last = ports.partition("-")
        pairs += [(address, port) for port in range(int(first), int(last or first) + 1)]
    return pairs


def serve(pairs: list[tuple[str, int]], banner: bytes) -> None:
    selector = selectors.DefaultSelector()
    opened: list[socket.socket] = []
    try:
        for address, port in pairs:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(1024)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        selector.register(sys.stdin, selectors.EVENT_READ)
        print("ready", flush=True)
        while True:
            for key, _events in selector.select():
                if key.fileobj is sys.stdin:
                    return  # the parent closed our stdin: time to go
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, _peer = listener.accept()
                except OSError:
                    continue
                if banner:
                    with contextlib.suppress(OSError):  # the scanner may hang up first
                        conn.send(banner)
                conn.close()
    finally:
        selector.close()
        for sock in opened:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--banner", default="")
    parser.add_argument("listeners", nargs="+", help="ADDRESS:PORT or ADDRESS:FIRST-LAST")
    args = parser.parse_args()
    serve(parse(args.listeners), args.banner.encode().decode("unicode_escape").encode())


if __name__ == "__main__":
    main()
