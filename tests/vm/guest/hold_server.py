"""Forking test server: every connection is accepted by a new child process.

Run as `python3 hold_server.py HOLD`. It prints its listening port. The
parent keeps two children blocked in accept(); a child that accepted tells
the parent through a pipe, so a replacement is forked at once, keeps the
connection open for HOLD seconds, answers one byte and exits. Every accept
is therefore done by a process the broker has not placed yet, and the
number of open connections follows the client's arrival rate.
"""

import os
import socket
import sys
import time

WAITING = 2  # children blocked in accept() at any time


def child(server: socket.socket, hold: float, accepted: int) -> None:
    conn, _ = server.accept()
    os.write(accepted, b"a")
    time.sleep(hold)
    conn.sendall(b"1")
    conn.close()


def spawn(server: socket.socket, hold: float, accepted: int) -> None:
    if os.fork() == 0:
        try:
            child(server, hold, accepted)
        finally:
            os._exit(0)


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    hold = float(sys.argv[1])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    print(server.getsockname()[1], flush=True)
    readable, accepted = os.pipe()
    for _ in range(WAITING):
        spawn(server, hold, accepted)
    while True:
        for _ in os.read(readable, 64):
            spawn(server, hold, accepted)
        reap()


if __name__ == "__main__":
    main()
