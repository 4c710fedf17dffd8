"""A fixture of listening TCP ports that accepts and drops every connection, until stdin closes.

Run it inside a network namespace: ``python -m bench.listeners --address 127.0.0.1 22 80``.
It prints ``ready`` once every port listens, so the caller never races the bind.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys


def serve(address: str, ports: list[int]) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    selector = selectors.DefaultSelector()
    listeners: list[socket.socket] = []
    try:
        for port in ports:
            sock = socket.socket(family, socket.SOCK_STREAM)
            listeners.append(sock)
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
                except BlockingIOError:
                    continue
                conn.close()
    finally:
        selector.close()
        for sock in listeners:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("ports", type=int, nargs="+")
    args = parser.parse_args()
    serve(args.address, args.ports)


if __name__ == "__main__":
    main()
