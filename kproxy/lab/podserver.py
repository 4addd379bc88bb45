"""The lab's pod server: a TCP and UDP echo server that says who it is and whom it saw.

Every TCP connection first gets one JSON line {"pod", "ip", "port", "proto", "client"} and then an
echo of whatever it sends (so a test can keep a stream open and check it still works). Every UDP
datagram gets the same JSON line back, with the datagram echoed in "echo".

It serves both families on every port, with one socket per family (an IPv6-only socket beside the
IPv4 one, so an IPv4 client is still seen as "10.244.1.11:PORT", never as an IPv4-mapped "::ffff:"
address). "ip" is the pod's address of the family the client used (--ip, --ip6); "client" is
"ADDR:PORT" for IPv4 and "[ADDR]:PORT" for IPv6. Without IPv6 in the kernel it serves IPv4 only.

It binds numeric addresses and never resolves a name: inside an isolated namespace a name lookup
hangs (see DESIGN.md).

    python -m kproxy.lab.podserver --name n1p1 --ip 10.244.1.11 [--ip6 fd00:10:244:1::11]
        --port 8080 [--port 9090] [--ready-file F]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import threading


def hello(
    name: str, ip: str, port: int, proto: str, peer: tuple[str, int] | tuple[str, int, int, int],
    echo: str | None = None,
) -> bytes:  # fmt: skip
    msg: dict[str, object] = {
        "pod": name,
        "ip": ip,
        "port": port,
        "proto": proto,
        "client": f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}",
    }
    if echo is not None:
        msg["echo"] = echo
    return (json.dumps(msg) + "\n").encode()


def serve_tcp_conn(
    conn: socket.socket, name: str, ip: str, port: int, peer: tuple[str, int] | tuple[str, int, int, int]
) -> None:
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


def bound(family: int, kind: int, port: int) -> socket.socket:
    """A socket of FAMILY on the wildcard address and PORT; an IPv6 one accepts IPv6 only."""
    srv = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            srv.bind(("::", port))
        else:
            srv.bind(("0.0.0.0", port))
    except BaseException:
        srv.close()
        raise
    return srv


def tcp_loop(name: str, ip: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    srv = bound(family, socket.SOCK_STREAM, port)
    srv.listen(512)

    def loop() -> None:
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=serve_tcp_conn, args=(conn, name, ip, port, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def udp_loop(name: str, ip: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    srv = bound(family, socket.SOCK_DGRAM, port)

    def loop() -> None:
        while True:
            data, peer = srv.recvfrom(65536)
            srv.sendto(hello(name, ip, port, "udp", peer, data.decode(errors="replace")), peer)

    threading.Thread(target=loop, daemon=True).start()
    return srv


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="kproxy lab pod echo server")
    ap.add_argument("--name", required=True)
    ap.add_argument("--ip", required=True, help="the IPv4 address reported to IPv4 clients")
    ap.add_argument("--ip6", default="", help="the IPv6 address reported to IPv6 clients")
    ap.add_argument("--port", type=int, action="append", default=[])
    ap.add_argument("--ready-file")
    args = ap.parse_args(argv)
    ports = args.port or [8080]
    keep = []
    ipv6 = socket.has_ipv6
    for port in ports:
        keep.append(tcp_loop(args.name, args.ip, port))
        keep.append(udp_loop(args.name, args.ip, port))
        if ipv6:
            try:
                keep.append(tcp_loop(args.name, args.ip6, port, socket.AF_INET6))
                keep.append(udp_loop(args.name, args.ip6, port, socket.AF_INET6))
            except OSError as e:  # e.g. a kernel booted with ipv6.disable=1
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                print(f"IPv6 unavailable, serving IPv4 only: {e}", flush=True)
                ipv6 = False
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
