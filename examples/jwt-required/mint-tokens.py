#!/usr/bin/env python3
"""Mint the JWKS and the tokens used by examples/jwt-required/test.yaml.

How it was run (once; its output was pasted into request-authentication.yaml and test.yaml):
    pip install cryptography        # any recent version; 48.0 was used
    python3 examples/jwt-required/mint-tokens.py

Both RSA-2048 keys live only in memory: no private key is written anywhere or committed.
Every run makes new keys, so re-running means pasting the new JWKS *and* all new tokens.
The test itself never runs this script.
"""
import base64
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ISSUER = "testing@secure.istio.io"
KID = "warden-example-key"
FAR_FUTURE = 4685989700   # 2118-06-29
ISSUED_AT = 1767225600    # 2026-01-01T00:00:00Z
EXPIRED_AT = 1772323200   # 2026-03-01T00:00:00Z, before the test's now (2026-06-01)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def sign(key, claims: dict) -> str:
    header = {"alg": "RS256", "kid": KID, "typ": "JWT"}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":"), sort_keys=True).encode())
        for part in (header, claims)
    )
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


def main() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # A second key that the RequestAuthentication does not know; its tokens carry the same kid,
    # so they are rejected by the signature check rather than by the key lookup.
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pub = key.public_key().public_numbers()
    jwks = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": KID,
                      "n": b64url_uint(pub.n), "e": b64url_uint(pub.e)}]}

    base = {"iss": ISSUER, "sub": ISSUER, "iat": ISSUED_AT, "exp": FAR_FUTURE}
    tokens = {
        "VALID": sign(key, base),
        "EXPIRED": sign(key, {**base, "exp": EXPIRED_AT}),
        "OTHER_SUB": sign(key, {**base, "sub": "other-user@secure.istio.io"}),
        "WRONG_KEY": sign(other_key, base),
    }

    print("# jwks (RequestAuthentication jwtRules[0].jwks):")
    print(json.dumps(jwks, separators=(",", ":")))
    print()
    print("tokens:")
    for name, token in tokens.items():
        print(f"  {name}: {token}")


if __name__ == "__main__":
    main()
