"""An identity provider for the OAUTHBEARER test: `python idp.py DIR` writes its ES256
signing key (DIR/idp.pem, PKCS#8) and the JWKS it publishes (DIR/jwks.json, key id idp-1),
which scripts/kafka-clients-test hands to the secured tidewater as `[auth.jwt] jwks_file`."""

import base64
import json
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64(n):
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


def main(out):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with open(os.path.join(out, "idp.pem"), "wb") as f:
        f.write(pem)
    public = key.public_key().public_numbers()
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "idp-1", "alg": "ES256", "use": "sig",
                      "x": b64(public.x), "y": b64(public.y)}]}
    with open(os.path.join(out, "jwks.json"), "w") as f:
        json.dump(jwks, f)


if __name__ == "__main__":
    main(sys.argv[1])
