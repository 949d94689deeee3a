"""Encryption at rest, per tenant (envelope encryption).

Each tenant has its own AES-256 data key (DEK) per version, created with the tenant and stored
only wrapped by the master key (KEK). A stored point's value, original value and unit, quality
code and source are sealed together with AES-256-GCM under the tenant's current DEK, with a
fresh 96-bit nonce per value and the row's identity (tenant, well, parameter, timestamp) as
associated data: a ciphertext copied to another row, or another tenant's schema, does not open.

    KeyProvider            wraps and unwraps DEKs (the master key here; KMS or Vault later)
    └── MasterKeyProvider  AES-256-GCM under WELLTEGRA_MASTER_KEY or a key file
    TenantKeyring          a tenant's DEKs by version: seal with the current one, open any

The master key never leaves this module: it is not logged, not put in errors, and not passed on
command lines (the environment or a file only).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "MASTER_KEY_ENV",
    "KeyProvider",
    "KeyringError",
    "MasterKeyProvider",
    "SealedValue",
    "TenantKeyring",
    "gap_identity",
    "load_master_key",
    "new_data_key",
    "pack_value",
    "quarantine_identity",
    "row_identity",
]

MASTER_KEY_ENV = "WELLTEGRA_MASTER_KEY"
_NONCE_BYTES = 12
# value, original value, quality code, then the lengths of original unit and source.
_HEADER = struct.Struct("<dd B H H")
_QUALITY = ("GOOD", "BAD", "UNCERTAIN")
_QUALITY_INDEX = {name: index for index, name in enumerate(_QUALITY)}


class KeyringError(Exception):
    """A key is missing, malformed, destroyed, or does not open a ciphertext."""


class KeyProvider(Protocol):
    """Wraps data keys for storage and unwraps them for use. ``context`` binds a wrapped key
    to its tenant and version, so it cannot be swapped for another's."""

    def wrap(self, data_key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...


class MasterKeyProvider:
    """Data keys wrapped with AES-256-GCM under a 32-byte master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise KeyringError("the master key must be 32 bytes")
        self._aead = AESGCM(master_key)

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], context)
        except InvalidTag as exc:
            raise KeyringError("a data key does not open with this master key") from exc


def load_master_key(
    environ: Mapping[str, str], key_file: Path | None, dev_key_file: Path | None = None
) -> bytes:
    """The master key from ``WELLTEGRA_MASTER_KEY`` (base64) or ``key_file`` (base64 text or 32
    raw bytes); in development (``dev_key_file``), one made on first use and kept there.
    Errors name the source, never the key."""
    if not environ.get(MASTER_KEY_ENV) and key_file is None and dev_key_file is not None:
        if not dev_key_file.exists():
            dev_key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dev_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(base64.b64encode(os.urandom(32)) + b"\n")
        key_file = dev_key_file
    if environ.get(MASTER_KEY_ENV):
        source, text = MASTER_KEY_ENV, environ[MASTER_KEY_ENV].encode()
    elif key_file is not None:
        source = str(key_file)
        try:
            text = key_file.read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot read master key file {key_file}: {exc.strerror}") from exc
        if len(text) == 32:
            return text
    else:
        raise KeyringError(
            f"no master key: set {MASTER_KEY_ENV} (base64 of 32 random bytes) or "
            "master_key_file in the configuration"
        )
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyringError(f"the master key in {source} is not valid base64") from exc
    if len(key) != 32:
        raise KeyringError(f"the master key in {source} must be 32 bytes, not {len(key)}")
    return key


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def row_identity(tenant_id: str, well_id: str, parameter_name: str, timestamp: datetime) -> bytes:
    """The associated data that ties a ciphertext to its row."""
    micros = round(timestamp.timestamp() * 1_000_000)
    return f"{tenant_id}\x1f{well_id}\x1f{parameter_name}\x1f{micros}".encode()


def pack_value(
    value: float, original_value: float, original_unit: str, quality_code: str, source: str
) -> bytes:
    """The plaintext of a stored point's secret part (what ``SealedValue.decode`` reads)."""
    unit, text = original_unit.encode(), source.encode()
    header = _HEADER.pack(value, original_value, _QUALITY_INDEX[quality_code], len(unit), len(text))
    return header + unit + text


def quarantine_identity(tenant_id: str, ingestion_id: str, index: int) -> bytes:
    """The associated data of a quarantined point: its ingestion and position."""
    return "\x1f".join((tenant_id, "quarantine", ingestion_id, str(index))).encode()


def gap_identity(tenant_id: str, ingestion_id: str, index: int) -> bytes:
    """The associated data of a data gap: its batch's ingestion and its position in the batch."""
    return "\x1f".join((tenant_id, "data_gap", ingestion_id, str(index))).encode()


@dataclass(frozen=True, slots=True)
class SealedValue:
    """What encryption protects in a stored point."""

    value: float
    original_value: float
    original_unit: str
    quality_code: str
    source: str

    def encode(self) -> bytes:
        return pack_value(
            self.value, self.original_value, self.original_unit, self.quality_code, self.source
        )

    @classmethod
    def decode(cls, data: bytes) -> SealedValue:
        value, original, quality, unit_len, source_len = _HEADER.unpack_from(data)
        start = _HEADER.size
        unit = data[start : start + unit_len].decode()
        source = data[start + unit_len : start + unit_len + source_len].decode()
        return cls(value, original, unit, _QUALITY[quality], source)


class TenantKeyring:
    """One tenant's data keys by version. Seals with the newest, opens with any it holds."""

    def __init__(self, tenant_id: str, keys: dict[int, bytes]) -> None:
        if not keys:
            raise KeyringError(f"tenant {tenant_id!r} has no usable data key (shredded?)")
        self.tenant_id = tenant_id
        self.version = max(keys)
        self._aeads = {version: AESGCM(key) for version, key in keys.items()}

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aeads[self.version].encrypt(nonce, plaintext, associated)

    def seal_many(self, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """``seal`` for a batch of (plaintext, associated data): one call to the system's random
        source for all the nonces, which is much of the cost of sealing a small value."""
        encrypt = self._aeads[self.version].encrypt
        nonces = os.urandom(_NONCE_BYTES * len(items))
        sealed = []
        for i, (plaintext, associated) in enumerate(items):
            nonce = nonces[i * _NONCE_BYTES : (i + 1) * _NONCE_BYTES]
            sealed.append(nonce + encrypt(nonce, plaintext, associated))
        return sealed

    def open(self, version: int, sealed: bytes, associated: bytes) -> bytes:
        aead = self._aeads.get(version)
        if aead is None:
            raise KeyringError(f"tenant {self.tenant_id!r} has no key version {version}")
        try:
            return aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
        except InvalidTag as exc:
            raise KeyringError("a value does not open: wrong row, wrong key or altered") from exc
