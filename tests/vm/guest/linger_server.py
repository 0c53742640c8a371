"""Test server that forks a long-lived child for every connection it accepts.

Run as `python3 linger_server.py PORT`. The parent accepts, and each child
sends one response line and then sleeps. A child therefore stays in the
cgroup it was born in (a warm slot once the parent was placed) until
something kills it. Each child's pid is appended to the file named by the
LINGER_PIDS variable.
"""

import os
import socket
import sys
import time


def main() -> None:
    port = int(sys.argv[1])
    pids = os.environ["LINGER_PIDS"]
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            with open(pids, "a") as handle:
                handle.write(f"{os.getpid()}\n")
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            time.sleep(3600)
            os._exit(0)
        conn.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


if __name__ == "__main__":
    main()
