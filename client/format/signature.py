"""Checking a packet's signature against the keys a caller trusts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from m2kt.errors import VerificationError
from m2kt.format.header import PacketHeader
from m2kt.format.keys import VerifyKey

__all__ = ["KeyLookup", "verify_signature"]

KeyLookup = VerifyKey | Iterable[VerifyKey] | Mapping[str, VerifyKey] | Callable[[str], VerifyKey | None]


def _resolver(keys: KeyLookup) -> Callable[[str], VerifyKey | None]:
    if isinstance(keys, VerifyKey):
        return lambda fp: keys if fp == keys.fingerprint else None
    if isinstance(keys, Mapping):
        return keys.get
    if callable(keys):
        return keys
    table = {k.fingerprint: k for k in keys}
    return table.get


def verify_signature(header: PacketHeader, keys: KeyLookup) -> VerifyKey:
    """Check the manifest's signature with the trusted key it names; return that key."""
    fp = header.manifest.key_fingerprint
    key = _resolver(keys)(fp)
    if key is None:
        raise VerificationError("unknown_key", f"the packet is signed by key {fp[:16]}…, which is not trusted here")
    if key.fingerprint != fp:
        raise VerificationError("key_mismatch", f"the key found for {fp[:16]}… has fingerprint {key.fingerprint[:16]}…")
    if not key.verify(header.signature, header.manifest_bytes):
        raise VerificationError("signature_invalid", f"the signature does not verify with key {fp[:16]}…")
    return key
