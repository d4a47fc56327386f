#!/usr/bin/env python3
"""stepup-v1 caller built on an independent RFC 9421 implementation.

Uses the PyPI packages `http-message-signatures` (signing) and `pyOpenSSL`
(for the TLS exporter, `export_keying_material`). It connects with mutual TLS
(TLS 1.3), sends a request, takes the `StepUp` challenge, signs the request
per stepup-v1 and resends it on the SAME connection (the channel binding is
per connection), then prints the final status.

Live, against an inbound sidecar:

    python3 sign_client.py --connect 127.0.0.1:15443 --server-name payments.default.svc \
        --cert client.pem --key client-key.pem --ca ca.pem \
        --method POST --path '/admin/rotate?x=1' --content-type application/json --body '{"a":1}'

Offline (used by `cargo run -p keyproof-stepup --example interop -- python-signs`):
reads a challenge JSON (request, Accept-Signature, exporter) and writes the
signed request as JSON to stdout.

    python3 sign_client.py --offline challenge.json --key key.pem

Exit status 0 when the final response is 2xx (live) or a signature was produced
(offline).
"""

import argparse
import base64
import datetime
import json
import socket
import sys

import http_sf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms
from http_message_signatures.structures import CaseInsensitiveDict

EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
TAG = "stepup-v1"
LABEL = "stepup"


class Message:
    """The request shape http-message-signatures reads: method, url, headers."""

    def __init__(self, method, url, headers):
        self.method = method
        self.url = url
        self.headers = CaseInsensitiveDict(headers)


def load_key(path):
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key, algorithms.ECDSA_P256_SHA256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, algorithms.ED25519
    raise SystemExit("key must be P-256 or Ed25519")


def keyid_of(key):
    """stepup-v1 keyid: base64url (no padding) of SHA-256 over the SPKI DER."""
    from cryptography.hazmat.primitives import hashes

    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = hashes.Hash(hashes.SHA256())
    h.update(spki)
    return base64.urlsafe_b64encode(h.finalize()).rstrip(b"=").decode()


def parse_challenge(accept_signature):
    """The stepup member of Accept-Signature: (components, params)."""
    parsed = http_sf.parse(accept_signature.encode(), tltype="dictionary")
    if LABEL not in parsed:
        raise SystemExit("no stepup member in Accept-Signature")
    inner, params = parsed[LABEL]
    components = [name for name, _ in inner]
    return components, params


def sign(method, url, headers, body, accept_signature, exporter, key, alg, now=None):
    """Adds Content-Digest, Stepup-Binding, Signature-Input and Signature."""
    components, params = parse_challenge(accept_signature)
    keyid = keyid_of(key)
    if params.get("tag") != TAG:
        raise SystemExit(f"unexpected tag {params.get('tag')!r}")
    if params.get("keyid") != keyid:
        raise SystemExit("challenge keyid is not our key: refusing to sign")
    if params.get("alg") != alg.algorithm_id:
        raise SystemExit(f"challenge alg {params.get('alg')!r} does not fit our key: refusing to sign")
    has_ct = any(k.lower() == "content-type" for k, _ in headers)
    # stepup-v1: content-type is covered iff the request has one.
    components = [c for c in components if c != "content-type"]
    if has_ct:
        components.insert(components.index("content-digest"), "content-type")
    msg = Message(method, url, headers)
    msg.headers["Stepup-Binding"] = ":" + base64.b64encode(exporter).decode() + ":"
    signer = HTTPMessageSigner(
        signature_algorithm=alg,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={keyid: key}),
    )
    created = datetime.datetime.fromtimestamp(now) if now else None
    signer.sign(
        msg,
        key_id=keyid,
        created=created,
        nonce=params["nonce"],
        label=LABEL,
        tag=TAG,
        include_alg=True,
        covered_component_ids=components,
        body=body,  # the library adds Content-Digest: sha-256=:...:
    )
    return list(msg.headers.items())


def read_response(conn):
    """Minimal HTTP/1.1 response reader (Content-Length or chunked)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before response headers")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    hmap = {k.lower(): v for k, v in headers}
    if hmap.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        data = rest
        while True:
            while b"\r\n" not in data:
                data += conn.recv(65536)
            size_line, data = data.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                data += conn.recv(65536)
            body += data[:size]
            data = data[size + 2 :]
            if size == 0:
                break
    else:
        length = int(hmap.get("content-length", "0"))
        body = rest
        while len(body) < length:
            body += conn.recv(65536)
    return status, headers, body


def send_request(conn, method, path, headers, body):
    out = f"{method} {path} HTTP/1.1\r\n"
    for k, v in headers:
        out += f"{k}: {v}\r\n"
    out += f"Content-Length: {len(body)}\r\n\r\n"
    conn.sendall(out.encode("latin-1") + body)


def live(args):
    from OpenSSL import SSL

    key, alg = load_key(args.key)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(args.cert)
    ctx.use_privatekey_file(args.key)
    ctx.load_verify_locations(args.ca)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
    host, port = args.connect.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    conn = SSL.Connection(ctx, sock)
    # SPIFFE SVIDs carry URI SANs only; the CA check above is what authenticates.
    conn.set_tlsext_host_name(args.server_name.encode())
    conn.set_connect_state()
    conn.do_handshake()
    exporter = conn.export_keying_material(EXPORTER_LABEL, 32, None)

    authority = args.server_name
    url = f"https://{authority}{args.path}"
    headers = [("Host", authority)]
    if args.content_type:
        headers.append(("Content-Type", args.content_type))
    body = args.body.encode()

    send_request(conn, args.method, args.path, headers, body)
    status, resp_headers, resp_body = read_response(conn)
    print(f"first response: {status}")
    hmap = {k.lower(): v for k, v in resp_headers}
    if status != 401 or not hmap.get("www-authenticate", "").lower().startswith("stepup"):
        print(resp_body.decode(errors="replace"))
        return 0 if 200 <= status < 300 else 1
    print(f"challenge: {hmap.get('www-authenticate')}")
    signed = sign(args.method, url, headers, body, hmap["accept-signature"], exporter, key, alg)
    send_request(conn, args.method, args.path, [(k, v) for k, v in signed], body)
    status, resp_headers, resp_body = read_response(conn)
    print(f"signed response: {status}")
    for k, v in resp_headers:
        if k.lower() in ("www-authenticate", "accept-signature"):
            print(f"  {k}: {v}")
    sys.stdout.write(resp_body.decode(errors="replace"))
    return 0 if 200 <= status < 300 else 1


def offline(args):
    with open(args.offline) as f:
        ch = json.load(f)
    key, alg = load_key(args.key)
    headers = [tuple(h) for h in ch["headers"]]
    body = base64.b64decode(ch["body_b64"])
    exporter = base64.b64decode(ch["exporter_b64"])
    signed = sign(ch["method"], ch["url"], headers, body, ch["accept_signature"], exporter, key, alg, ch.get("now"))
    json.dump(
        {"method": ch["method"], "url": ch["url"], "headers": signed, "body_b64": ch["body_b64"]},
        sys.stdout,
    )
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", help="host:port of the inbound sidecar")
    p.add_argument("--server-name", default="localhost", help="SNI and Host/authority")
    p.add_argument("--cert", help="client certificate chain (PEM)")
    p.add_argument("--key", required=True, help="client private key (PEM, P-256 or Ed25519)")
    p.add_argument("--ca", help="trust bundle (PEM)")
    p.add_argument("--method", default="POST")
    p.add_argument("--path", default="/")
    p.add_argument("--content-type")
    p.add_argument("--body", default="")
    p.add_argument("--offline", help="challenge JSON to sign without a network")
    args = p.parse_args()
    if args.offline:
        return offline(args)
    if not (args.connect and args.cert and args.ca):
        p.error("--connect, --cert and --ca are required unless --offline")
    return live(args)


if __name__ == "__main__":
    sys.exit(main())
