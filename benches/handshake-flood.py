#!/usr/bin/env python3
"""A handshake flood against a TLS listener, for measuring what pending
handshakes cost the server: opens COUNT connections (RATE a second), each
sends a real TLS 1.3 ClientHello and then nothing, and holds them all for
HOLD seconds (the server closes the ones it sheds or times out; watch its
keyproof_connections_open and RSS meanwhile).

usage: benches/handshake-flood.py HOST:PORT COUNT [RATE] [HOLD]
Loopback only; bounded in count and time.
"""
import socket
import ssl
import sys
import time


def client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    count = int(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 1000.0
    hold = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    assert host in ("127.0.0.1", "localhost", "::1"), "loopback only"
    hello = client_hello()
    socks = []
    start = time.monotonic()
    for i in range(count):
        try:
            s = socket.create_connection((host, int(port)), timeout=2)
            s.sendall(hello)
            socks.append(s)
        except OSError:
            pass
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(f"opened {len(socks)} connections in {time.monotonic() - start:.1f}s", flush=True)
    time.sleep(hold)


if __name__ == "__main__":
    main()
