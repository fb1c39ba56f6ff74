from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from m2kt.errors import KeyFileError
from m2kt.format.keys import SigningKey, generate_keypair, load_signing_key, load_verify_key, parse_verify_key


@pytest.mark.parametrize("fmt", ["pem", "raw"])
def test_generated_key_files_load_and_sign(tmp_path: Path, fmt: str) -> None:
    paths = generate_keypair(tmp_path, "teacher", fmt=fmt)
    assert stat.S_IMODE(paths.private.stat().st_mode) == 0o600
    private, public = load_signing_key(paths.private), load_verify_key(paths.public)
    assert private.verify_key == public
    assert public.fingerprint == paths.fingerprint == hashlib.sha256(public.raw).hexdigest()
    assert public.verify(private.sign(b"manifest"), b"manifest")
    assert not public.verify(private.sign(b"manifest"), b"manifesT")
    assert not public.verify(b"short", b"manifest")


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "a")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path, "a")
    assert generate_keypair(tmp_path, "a", overwrite=True).private.exists()


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        pytest.param(None, 0o600, "no such key file", id="missing"),
        pytest.param(b"hello", 0o600, "neither PEM nor base64", id="garbage"),
        pytest.param(b"AAAA", 0o600, "decodes to 3 bytes", id="short-base64"),
        pytest.param(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            0o600,
            "not a readable PEM",
            id="broken-pem",
        ),
        pytest.param("valid", 0o644, "too open", id="world-readable"),
        pytest.param("public", 0o600, "this is a public key", id="public-as-private"),
        pytest.param("rsa", 0o600, "not an Ed25519 key", id="rsa-key"),
    ],
)
def test_loading_a_bad_private_key_names_the_problem(tmp_path: Path, content, mode: int, message: str) -> None:
    path = tmp_path / "k.key"
    if content == "valid":
        path.write_text(SigningKey.generate().to_pem())
    elif content == "public":
        path.write_text(SigningKey.generate().verify_key.to_pem())
    elif content == "rsa":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        path.write_bytes(
            rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    elif content is not None:
        path.write_bytes(content)
    if path.exists():
        os.chmod(path, mode)
    with pytest.raises(KeyFileError) as err:
        load_signing_key(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_public_key_parsing(tmp_path: Path) -> None:
    key = SigningKey.generate()
    assert parse_verify_key(key.verify_key.to_pem()) == key.verify_key
    assert parse_verify_key(key.verify_key.to_base64()) == key.verify_key
    with pytest.raises(KeyFileError, match="this is a private key"):
        parse_verify_key(key.to_pem())


def test_seeded_keys_are_deterministic() -> None:
    assert SigningKey.from_seed(b"\x01" * 32).fingerprint == SigningKey.from_seed(b"\x01" * 32).fingerprint
