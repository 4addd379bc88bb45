"""The lab's pod server: a TCP and UDP echo server that says who it is and whom it saw.

Every TCP connection first gets one JSON line {"pod", "ip", "port", "proto", "client"} and then an
echo of whatever it sends (so a test can keep a stream open and check it still works). Every UDP
datagram gets the same JSON line back, with the datagram echoed in "echo".

It binds numeric addresses and never resolves a name: inside an isolated namespace a name lookup
hangs (see DESIGN.md).

    python -m kproxy.lab.podserver --name n1p1 --ip 10.244.1.11 --port 8080 [--port 9090] [--ready-file F]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading


def hello(name: str, ip: str, port: int, proto: str, peer: tuple[str, int], echo: str | None = None) -> bytes:
    msg: dict[str, object] = {
        "pod": name,
        "ip": ip,
        "port": port,
        "proto": proto,
        "client": f"{peer[0]}:{peer[1]}",
    }
    if echo is not None:
        msg["echo"] = echo
    return (json.dumps(msg) + "\n").encode()


def serve_tcp_conn(conn: socket.socket, name: str, ip: str, port: int, peer: tuple[str, int]) -> None:
    with conn:
        try:
            conn.sendall(hello(name, ip, port, "tcp", peer))
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return


def tcp_loop(name: str, ip: str, port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(512)

    def loop() -> None:
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=serve_tcp_conn, args=(conn, name, ip, port, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def udp_loop(name: str, ip: str, port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))

    def loop() -> None:
        while True:
            data, peer = srv.recvfrom(65536)
            srv.sendto(hello(name, ip, port, "udp", peer, data.decode(errors="replace")), peer)

    threading.Thread(target=loop, daemon=True).start()
    return srv


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="kproxy lab pod echo server")
    ap.add_argument("--name", required=True)
    ap.add_argument("--ip", required=True)
    ap.add_argument("--port", type=int, action="append", default=[])
    ap.add_argument("--ready-file")
    args = ap.parse_args(argv)
    ports = args.port or [8080]
    keep = []
    for port in ports:
        keep.append(tcp_loop(args.name, args.ip, port))
        keep.append(udp_loop(args.name, args.ip, port))
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.rename(tmp, args.ready_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    main()
