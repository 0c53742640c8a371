"""A loopback TCP server for probe tests: accepts COUNT connections, then exits.

Run as `python3 accept_server.py COUNT`; it binds an ephemeral port on
127.0.0.1 and prints the port number on stdout once it listens.
"""

import socket
import sys


def main() -> None:
    count = int(sys.argv[1])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(512)
    print(server.getsockname()[1], flush=True)
    for _ in range(count):
        conn, _ = server.accept()
        conn.close()


if __name__ == "__main__":
    main()
