"""Ed25519 keys for signing packets: generation, key files, fingerprints.

A key's **fingerprint** is the lowercase hex sha256 of its raw 32-byte public key; it is what
a manifest names and what the broker's key registry is keyed by.

Key files come in two encodings, both read transparently:

* PEM (default): PKCS#8 ``PRIVATE KEY`` / SubjectPublicKeyInfo ``PUBLIC KEY``, unencrypted;
* raw: one line of standard base64 of the 32-byte private seed or public key.

Private key files are written with mode 0600 and refused on load when group or others can
read them (as ssh does), with a message naming the fix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from m2kt.errors import KeyFileError

__all__ = [
    "KeyFileError",
    "KeyPairPaths",
    "SigningKey",
    "VerifyKey",
    "fingerprint_of",
    "generate_keypair",
    "load_signing_key",
    "load_verify_key",
    "parse_verify_key",
]

KeyFormat = Literal["pem", "raw"]
SIGNATURE_BYTES = 64
_MAX_KEY_FILE_BYTES = 16 * 1024


def fingerprint_of(raw_public_key: bytes) -> str:
    """Hex sha256 of a raw 32-byte Ed25519 public key."""
    if len(raw_public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw_public_key)}")
    return hashlib.sha256(raw_public_key).hexdigest()


class VerifyKey:
    """An Ed25519 public key that checks packet signatures.

    >>> key = SigningKey.generate().verify_key
    >>> len(key.fingerprint)
    64
    """

    __slots__ = ("_key", "raw", "fingerprint")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self.raw: bytes = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.fingerprint: str = fingerprint_of(self.raw)

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's signature of ``message``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def to_pem(self) -> str:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.fingerprint[:16]}…)"


class SigningKey:
    """An Ed25519 private key that signs manifests.

    >>> key = SigningKey.generate()
    >>> key.verify_key.verify(key.sign(b"m"), b"m")
    True
    """

    __slots__ = ("_key", "verify_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.verify_key = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from a 32-byte seed (tests, reproducible demos)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def fingerprint(self) -> str:
        return self.verify_key.fingerprint

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def to_pem(self) -> str:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")

    def to_base64(self) -> str:
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        return f"SigningKey({self.fingerprint[:16]}…)"


@dataclass(frozen=True)
class KeyPairPaths:
    private: Path
    public: Path
    fingerprint: str


def generate_keypair(
    out_dir: str | os.PathLike[str], name: str, *, fmt: KeyFormat = "pem", overwrite: bool = False
) -> KeyPairPaths:
    """Write ``NAME.key`` (mode 0600) and ``NAME.pub`` into ``out_dir``; refuses to overwrite."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(None, f"invalid key name {name!r}: use a plain file name like 'teacher'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    if not overwrite:
        for p in (private_path, public_path):
            if p.exists():
                raise KeyFileError(p, "already exists; refusing to overwrite (pick another --name)")
    key = SigningKey.generate()
    if fmt == "pem":
        private_text, public_text = key.to_pem(), key.verify_key.to_pem()
    elif fmt == "raw":
        private_text, public_text = key.to_base64() + "\n", key.verify_key.to_base64() + "\n"
    else:
        raise KeyFileError(None, f"unknown key format {fmt!r}: use 'pem' or 'raw'")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(private_text)
    os.chmod(private_path, 0o600)
    public_path.write_text(public_text, encoding="ascii")
    return KeyPairPaths(private_path, public_path, key.fingerprint)


def _read_key_text(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(path, "no such key file") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot read key file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(path, "not a regular file")
    if st.st_size > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(path, f"{st.st_size} bytes is too large for a key file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(path, f"cannot read key file: {exc.strerror}") from None


def _decode_raw(text: bytes, path: Path | None, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(path, f"neither PEM nor base64: not an Ed25519 {what} key") from None
    if len(raw) != 32:
        raise KeyFileError(path, f"base64 decodes to {len(raw)} bytes; an Ed25519 {what} key is 32")
    return raw


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load a private key file written by ``m2kt keygen`` (PEM or raw base64)."""
    p = Path(path)
    text = _read_key_text(p)
    mode = p.stat().st_mode
    if mode & 0o077:
        raise KeyFileError(p, f"permissions {stat.filemode(mode)} are too open for a private key; run: chmod 600 {p}")
    if text.lstrip().startswith(b"-----BEGIN"):
        if b"PUBLIC KEY" in text.split(b"\n", 1)[0]:
            raise KeyFileError(p, "this is a public key; signing needs the private key (NAME.key)")
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except TypeError:
            raise KeyFileError(p, "the private key is encrypted; M2KT reads unencrypted keys only") from None
        except ValueError as exc:
            raise KeyFileError(p, f"not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(p, f"not an Ed25519 key (found {type(key).__name__})")
        return SigningKey(key)
    return SigningKey(Ed25519PrivateKey.from_private_bytes(_decode_raw(text, p, "private")))


def parse_verify_key(text: str | bytes, *, path: Path | None = None) -> VerifyKey:
    """A public key from PEM or base64 text (key files, API payloads)."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    if data.lstrip().startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in data.split(b"\n", 1)[0]:
            raise KeyFileError(path, "this is a private key; share only the public key (NAME.pub)")
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(path, f"not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(path, f"not an Ed25519 key (found {type(key).__name__})")
        return VerifyKey(key)
    return VerifyKey.from_raw(_decode_raw(data, path, "public"))


def load_verify_key(path: str | os.PathLike[str]) -> VerifyKey:
    """Load a public key file (PEM or raw base64)."""
    p = Path(path)
    return parse_verify_key(_read_key_text(p), path=p)
