"""Proof of possession for registering a key: a signature, by the key itself, over the node it is for.

Without it, anyone could register someone else's public key under their own node first — the rightful
owner then gets ``key_taken``, and the squatter can revoke it. The proof is stateless: the signed
statement names the node the key is registered to, the key's fingerprint and when it was signed, so a
proof registers that key for that node only, and only within the broker's freshness window.

The proof is also what a node hands an admin who registers its key for it (``m2kt key prove``): the
private key never leaves the node.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import asdict, dataclass

from m2kt.format.keys import SigningKey, VerifyKey

__all__ = ["KeyProof", "prove_key", "proof_problem", "registration_statement"]

_DOMAIN = b"m2kt key registration v1\n"


def registration_statement(node: str, fingerprint: str, signed_at: int) -> bytes:
    """The exact bytes a key signs to be registered for ``node`` (domain-separated from manifests)."""
    return _DOMAIN + json.dumps({"key": fingerprint, "node": node, "signed_at": signed_at}, sort_keys=True).encode()


@dataclass(frozen=True)
class KeyProof:
    """A public key with its owner's signature over the registration statement."""

    public_key: str  # PEM
    node: str
    signed_at: int  # Unix seconds
    signature: str  # base64 of the 64-byte Ed25519 signature

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KeyProof:
        data = json.loads(text)
        return cls(str(data["public_key"]), str(data["node"]), int(data["signed_at"]), str(data["signature"]))


def prove_key(key: SigningKey, node: str, *, now: float | None = None) -> KeyProof:
    """Sign the statement that registers ``key`` for ``node``."""
    signed_at = int(time.time() if now is None else now)
    signature = key.sign(registration_statement(node, key.fingerprint, signed_at))
    return KeyProof(key.verify_key.to_pem(), node, signed_at, base64.b64encode(signature).decode("ascii"))


def proof_problem(
    key: VerifyKey, node: str, signed_at: int, signature: str, *, now: float, max_age: float, max_skew: float = 300
) -> str | None:
    """Why this proof does not register ``key`` for ``node`` now, or None when it does."""
    if signed_at > now + max_skew:
        return f"the proof is signed {signed_at - now:.0f} s in the future; check this machine's clock"
    if now - signed_at > max_age:
        return f"the proof is {now - signed_at:.0f} s old, over the broker's {max_age:.0f} s; sign a new one"
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return "the proof's signature is not base64"
    if not key.verify(raw, registration_statement(node, key.fingerprint, signed_at)):
        return f"the proof is not this key's signature over its registration for node {node!r}"
    return None
