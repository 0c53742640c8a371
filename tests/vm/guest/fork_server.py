"""Forking test server: each connection is accepted by a new child process.

Run as `python3 fork_server.py COUNT PREFIX`. For each of COUNT connections
the parent forks a child that accepts one connection, then watches its own
/proc/self/cgroup until it starts with PREFIX (at most 5 s), and replies with
one line: "<cgroup> <microseconds from accept return to seeing the move>".
A reply of "- -1" means the child was never moved. The parent prints its
listening port first and never accepts itself, so each child is a new
process that the broker has not placed yet.
"""

import os
import socket
import sys
import time


def watch_move(prefix: str) -> tuple[str, int]:
    accepted = time.monotonic_ns()
    deadline = accepted + 5_000_000_000
    while True:
        with open("/proc/self/cgroup") as handle:
            path = handle.read().strip().split("::", 1)[-1]
        now = time.monotonic_ns()
        if path.startswith(prefix):
            return path, (now - accepted) // 1000
        if now > deadline:
            return "-", -1
        time.sleep(0.0005)


def serve_one(server: socket.socket, prefix: str) -> None:
    conn, _ = server.accept()
    path, micros = watch_move(prefix)
    conn.sendall(f"{path} {micros}\n".encode())
    conn.close()


def main() -> None:
    count, prefix = int(sys.argv[1]), sys.argv[2]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    print(server.getsockname()[1], flush=True)
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                serve_one(server, prefix)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
