#!/usr/bin/env python3
"""Verifies a captured stepup-v1 signed request with an independent RFC 9421
implementation (PyPI `http-message-signatures`).

Input: a JSON file {"method", "url", "headers": [[name, value], ...],
"body_b64", "public_key_pem" or "cert_pem"} as written by
`cargo run -p keyproof-stepup --example interop -- signed-json`.
With --exporter-b64 the Stepup-Binding is also compared with the expected
channel binding.

    python3 verify.py request.json [--exporter-b64 B64]

Prints "OK ..." and exits 0 when the signature, tag, components and
Content-Digest all check out; otherwise prints the reason and exits 1.
"""

import argparse
import base64
import hashlib
import json
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from http_message_signatures import HTTPMessageVerifier, InvalidSignature, MappingKeyResolver, algorithms
from http_message_signatures.structures import CaseInsensitiveDict

REQUIRED = ["@method", "@authority", "@path", "@query", "content-digest", "stepup-binding"]


class Message:
    def __init__(self, method, url, headers):
        self.method = method
        self.url = url
        self.headers = CaseInsensitiveDict(headers)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request_json")
    p.add_argument("--exporter-b64", help="expected channel binding (base64)")
    args = p.parse_args()
    with open(args.request_json) as f:
        req = json.load(f)
    if "cert_pem" in req:
        from cryptography import x509

        pub = x509.load_pem_x509_certificate(req["cert_pem"].encode()).public_key()
    else:
        pub = serialization.load_pem_public_key(req["public_key_pem"].encode())
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        alg = algorithms.ECDSA_P256_SHA256
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        alg = algorithms.ED25519
    else:
        print("unsupported key type")
        return 1
    spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    keyid = base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()
    msg = Message(req["method"], req["url"], [tuple(h) for h in req["headers"]])
    body = base64.b64decode(req["body_b64"])
    required = list(REQUIRED)
    if "content-type" in msg.headers:
        required.append("content-type")
    verifier = HTTPMessageVerifier(
        signature_algorithm=alg,
        key_resolver=MappingKeyResolver(public_keys={keyid: pem}, private_keys={}),
    )
    try:
        results = verifier.verify(
            msg, expect_tag="stepup-v1", expect_label="stepup", require_components=required, body=body, max_age=None
        )
    except InvalidSignature as e:
        print(f"INVALID: {e}")
        return 1
    r = results[0]
    params = r.parameters
    if params.get("alg") != alg.algorithm_id:
        print(f"INVALID: alg {params.get('alg')!r}")
        return 1
    if args.exporter_b64:
        binding = msg.headers["stepup-binding"].strip(":")
        if base64.b64decode(binding) != base64.b64decode(args.exporter_b64):
            print("INVALID: Stepup-Binding is not the expected channel binding")
            return 1
    print(f"OK label={r.label} alg={params.get('alg')} keyid={params.get('keyid')} nonce={params.get('nonce')} "
          f"components={list(r.covered_components)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
