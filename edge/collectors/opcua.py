"""The ``opcua`` collector: the tags of an OPC UA server, by subscription or by polling (asyncua).

Each time it starts (and the agent's supervisor restarts it, with backoff, after any failure):

1. It connects with the configured security: ``None``, ``Sign`` or ``SignAndEncrypt`` with
   Basic256Sha256 or Aes128Sha256RsaOaep, the agent's client certificate (generated in
   ``certificate_dir`` on first start when absent, then kept), the server's certificate checked
   against a pinned file or a trust directory, and a username and password when given.
2. It resolves every tag: the node must exist and be readable; a tag without ``unit`` takes the
   display name of the node's ``EngineeringUnits`` (EUInformation), in our spelling. A tag that
   fails is logged once with the reason, counted, and left out: the other tags go on.
3. It fills the gap since the last run from the server's history (HistoryRead, raw values), from
   each tag's watermark on, page by page, where the server keeps history.
4. It subscribes (one subscription, one monitored item per tag, a DataChangeFilter that reports
   value, status and timestamp changes, with the tag's absolute deadband) or polls, and reads the
   history of subscribed tags once more, to catch what changed while the subscription was made.
5. It emits readings until cancelled. A tag's watermark is the source timestamp of the last
   value emitted for it; a value whose timestamp is not after it is taken as already delivered.

It raises ``CollectorError`` when the connection is lost, when the server ends the subscription
(a status change such as BadTimeout), when the notification queue overflows because the buffer
cannot keep up, and when the session is connected but silent: neither data nor a keep-alive for
``watchdog_intervals`` publishing intervals. The agent restarts it and step 3 fills the gap.

Values: numbers as they are, booleans as 0 and 1; anything else (text, arrays, structures) is
skipped with one warning per tag. The status code's severity bits give the quality: Good, Uncertain
or Bad. Timestamps are the source's, else the server's, else (counted, warned once per tag) the
agent's clock.

Errors (all ``CollectorError``, from ``edge.collectors.base``):

    retryable   the server cannot be reached, went away, ended the subscription, was silent, or
                refused the agent's certificate (which its administrator may trust later)
    permanent   the server refused the username or password, its certificate is not trusted or not
                the pinned one, it offers no endpoint with the configured security, or the agent's
                certificate files cannot be used
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.collectors.base import CollectorError, ReadingSink
from edge.collectors.opcua_config import OpcUaConfig, OpcUaConnection, OpcUaTag
from edge.readings import Quality, Reading

__all__ = [
    "CLIENT_CERTIFICATE_FILE",
    "CLIENT_KEY_FILE",
    "OpcUaCollector",
    "OpcUaConfig",
    "OpcUaConnection",
    "OpcUaTag",
    "ensure_client_certificate",
    "quality_of",
    "unit_from_eu",
]

log = logging.getLogger(__name__)

CLIENT_CERTIFICATE_FILE = "welltegra-agent.der"
CLIENT_KEY_FILE = "welltegra-agent.key.pem"
_LOCK_FILE = ".welltegra-agent.lock"
CERTIFICATE_DAYS = 5 * 365

# At most this many readings per emit.
CHUNK_READINGS = 5_000
# Notifications asyncua may hold for us, and readings waiting for the buffer. When both are full
# the notification queue overflows, which counts as a lost session (see the module docstring).
NOTIFICATION_QUEUE = 10_000
PENDING_READINGS = 10_000
# Emits of notifications waiting for their batch to be sealed at once (see _emit_notifications).
EMITS_IN_FLIGHT = 8
# A subscription outlives this many missed publish cycles, at least (spec: ≥ 3 keep-alives).
_MIN_LIFETIME = timedelta(minutes=1)

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
}
_MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

_S = StatusCodes
# Read statuses that mean the tag cannot work at all (as opposed to a value that is bad now).
_TAG_UNUSABLE = frozenset(
    {
        _S.BadNodeIdUnknown,
        _S.BadNodeIdInvalid,
        _S.BadAttributeIdInvalid,
        _S.BadNotReadable,
        _S.BadUserAccessDenied,
        _S.BadNotSupported,
    }
)
# A monitored item refused for its filter: tried again without one, when the tag has no deadband.
_FILTER_REFUSED = frozenset(
    {
        _S.BadMonitoredItemFilterUnsupported,
        _S.BadMonitoredItemFilterInvalid,
        _S.BadFilterNotAllowed,
        _S.BadDeadbandFilterInvalid,
    }
)
_CREDENTIALS_REFUSED = frozenset(
    {
        _S.BadUserAccessDenied,
        _S.BadIdentityTokenRejected,
        _S.BadIdentityTokenInvalid,
        _S.BadUserSignatureInvalid,
    }
)
_CERTIFICATE_REFUSED = frozenset(
    {
        _S.BadCertificateUntrusted,
        _S.BadSecurityChecksFailed,
        _S.BadCertificateInvalid,
        _S.BadCertificateUriInvalid,
        _S.BadCertificateTimeInvalid,
        _S.BadCertificateRevoked,
        _S.BadCertificateUseNotAllowed,
    }
)

_WIN_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)

# EUInformation display names (lower case, no spaces, ² ³ as 2 3) in the registry's spelling.
_EU_NAMES: dict[str, str] = {
    "psi": "psi",
    "lbf/in2": "psi",
    "bar": "bar",
    "kpa": "kPa",
    "mpa": "MPa",
    "°f": "degF",
    "degf": "degF",
    "fahrenheit": "degF",
    "degreefahrenheit": "degF",
    "°c": "degC",
    "degc": "degC",
    "celsius": "degC",
    "degreecelsius": "degC",
    "k": "K",
    "kelvin": "K",
    "klb": "klbs",
    "klbs": "klbs",
    "kip": "klbs",
    "kips": "klbs",
    "lb": "lbs",
    "lbs": "lbs",
    "t": "t",
    "tonne": "t",
    "tonnes": "t",
    "kn": "kN",
    "bbl/d": "bbl/day",
    "bbl/day": "bbl/day",
    "bpd": "bbl/day",
    "m3/h": "m3/h",
    "m3/hr": "m3/h",
    "m3/d": "m3/day",
    "m3/day": "m3/day",
}
# UNECE Recommendation 20 common codes (EUInformation.UnitId), when the display name says nothing.
_UNECE_CODES: dict[str, str] = {
    "PS": "psi",
    "BAR": "bar",
    "KPA": "kPa",
    "MPA": "MPa",
    "FAH": "degF",
    "CEL": "degC",
    "KEL": "K",
    "LBR": "lbs",
    "TNE": "t",
    "B47": "kN",
    "B1": "bbl/day",
    "MQH": "m3/h",
}


# --- mapping values ----------------------------------------------------------------------------


def quality_of(status: ua.StatusCode | None) -> Quality:
    """The quality of a status code, from its severity bits (30-31): Good, Uncertain, Bad."""
    severity = 0 if status is None else (int(status.value) >> 30) & 0b11
    if severity == 0:
        return Quality.GOOD
    return Quality.UNCERTAIN if severity == 1 else Quality.BAD


def _unece_code(unit_id: int) -> str:
    raw = (unit_id & 0xFFFFFF).to_bytes(3, "big").lstrip(b"\x00")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return ""


def unit_from_eu(eu: ua.EUInformation) -> str | None:
    """Our spelling of an EUInformation's unit: its display name (mapped where ours differs,
    kept as it is otherwise), else its UNECE code; None when it gives neither."""
    name = (eu.DisplayName.Text or "").strip() if eu.DisplayName is not None else ""
    if name:
        key = name.lower().replace(" ", "").replace("²", "2").replace("³", "3")
        return _EU_NAMES.get(key, name)
    if eu.UnitId and eu.UnitId > 0:
        return _UNECE_CODES.get(_unece_code(eu.UnitId))
    return None


class _NotNumeric:
    """A value that is not a number: ``kind`` names it for the warning."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


def _number(variant: ua.Variant | None) -> float | _NotNumeric | None:
    value: Any = None if variant is None else variant.Value
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return _NotNumeric("an integer too large for a float")
    if isinstance(value, list | tuple):
        return _NotNumeric("an array")
    return _NotNumeric(type(value).__name__)


def _utc(instant: datetime | None) -> datetime | None:
    if instant is None:
        return None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    instant = instant.astimezone(UTC)
    return None if instant <= _WIN_EPOCH else instant


def _status_text(code: int) -> str:
    return ua.StatusCode(ua.UInt32(code)).name


# --- the client certificate --------------------------------------------------------------------


def _thumbprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA1()).hex()  # OPC UA's thumbprint is SHA-1


def _application_uri(certificate: x509.Certificate) -> str | None:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def ensure_client_certificate(directory: Path) -> tuple[Path, Path, str, bool]:
    """The agent's certificate and key in ``directory``, generated when both are absent (a
    self-signed application instance certificate valid for five years, key mode 0600), and
    kept otherwise; with the certificate's application URI and whether it was just made.

    Raises ``CollectorError`` (permanent) when only one of the two files exists or they cannot
    be read."""
    certificate_path = directory / CLIENT_CERTIFICATE_FILE
    key_path = directory / CLIENT_KEY_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Several opcua sources may share the directory and start together: one generates.
        with (directory / _LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            created = False
            if not certificate_path.exists() and not key_path.exists():
                _generate_certificate(certificate_path, key_path)
                created = True
            elif not certificate_path.exists() or not key_path.exists():
                present, missing = (
                    (certificate_path, key_path)
                    if certificate_path.exists()
                    else (key_path, certificate_path)
                )
                raise CollectorError(
                    f"{present} exists but {missing} does not: restore it, or remove both to "
                    "have a new certificate generated (which the server must then trust)",
                    retryable=False,
                )
            certificate = x509.load_der_x509_certificate(certificate_path.read_bytes())
    except OSError as exc:
        raise CollectorError(
            f"cannot use the client certificate in {directory}: {exc}", retryable=False
        ) from exc
    except ValueError as exc:
        raise CollectorError(
            f"{certificate_path} is not a DER certificate: {exc}", retryable=False
        ) from exc
    uri = _application_uri(certificate)
    if uri is None:
        raise CollectorError(
            f"{certificate_path} has no application URI (a URI subject alternative name), which "
            "OPC UA needs",
            retryable=False,
        )
    if certificate.not_valid_after_utc < datetime.now(UTC):
        raise CollectorError(
            f"{certificate_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}: remove "
            f"it and {key_path.name} to have a new one generated, then trust that one on the "
            "server",
            retryable=False,
        )
    return certificate_path, key_path, uri, created


def _generate_certificate(certificate_path: Path, key_path: Path) -> None:
    host = socket.gethostname()
    uri = f"urn:{host}:welltegra:edge-agent"
    key = cert_gen.generate_private_key()
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        "WellTegra edge agent",
        {"organizationName": "WellTegra"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(host)],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        days=CERTIFICATE_DAYS,
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(cert_gen.dump_private_key_as_pem(key))
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))


def _first_certificate(der: bytes) -> bytes:
    """The first certificate of a DER chain (a server may send its chain in one blob)."""
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        return der[: int.from_bytes(der[2:4], "big") + 4]
    return der


def _load_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


class _TrustDirectory:
    """The server certificate check of ``trust_dir``: the certificate itself is there, or it was
    signed by a certificate that is (and is within its validity). Read at each connection, so a
    certificate added to the directory counts from the next attempt."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.refused: x509.Certificate | None = None

    def _trusted(self) -> list[x509.Certificate]:
        certificates = []
        for path in sorted(self.directory.glob("*")):
            if path.suffix.lower() in (".der", ".pem", ".crt", ".cer") and path.is_file():
                try:
                    certificates.append(_load_certificate(path))
                except ValueError:
                    log.warning("trust_dir: %s is not a certificate; ignored", path)
        return certificates

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return False
        for trusted in self._trusted():
            if trusted == certificate:
                return True
            if trusted.subject != certificate.issuer:
                continue
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                certificate.verify_directly_issued_by(trusted)
                return True
        return False

    async def validate(self, certificate: x509.Certificate, _: ua.ApplicationDescription) -> None:
        trusted = await asyncio.to_thread(self.is_trusted, certificate)
        if not trusted:
            self.refused = certificate
            raise ServiceError(_S.BadCertificateUntrusted)


# --- the collector -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Tag:
    """One tag at run time."""

    config: OpcUaTag
    node_id: ua.NodeId
    unit: str = ""
    poll: float | None = None  # seconds; None: subscribed
    deadband: float | None = None
    # Source timestamp of the last value taken; what the watermark becomes once it is emitted.
    latest: datetime | None = None
    # Source timestamp of the last status taken without a value (not a watermark).
    empty_at: datetime | None = None
    warned: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return self.config.node_id


class _Outbox:
    """Readings of notifications, waiting to be emitted; bounded: a full outbox makes the
    notification reader wait (and then asyncua's queue overflows, which counts as lost)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._readings: list[tuple[_Tag, Reading]] = []
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    async def put(self, tag: _Tag, reading: Reading) -> None:
        while len(self._readings) >= self._limit:
            self._space.clear()
            await self._space.wait()
        self._readings.append((tag, reading))
        self._ready.set()

    async def take(self) -> list[tuple[_Tag, Reading]]:
        await self._ready.wait()
        taken, self._readings = self._readings, []
        self._ready.clear()
        self._space.set()
        return taken


class OpcUaCollector:
    """The running collector: implements ``Collector``; see the module docstring.

    ``counts`` holds what was set aside or noticed, by reason (``bad_tag``, ``not_numeric``,
    ``repeated``, ``out_of_order``, ``no_timestamp``, ``no_history``, ``queue_overflow``,
    ``unreadable``), for logs and tests."""

    def __init__(self, config: OpcUaConfig) -> None:
        self.config = config
        self.counts: Counter[str] = Counter()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._trust = (
            _TrustDirectory(config.connection.trust_dir)
            if config.connection.trust_dir is not None
            else None
        )
        self._client_certificate: Path | None = None
        self._bad_tags: list[str] = []

    # --- connection ----------------------------------------------------------------------------

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._lose(f"the connection to {self.config.connection.endpoint} was lost ({exc})")

    async def _connect(self) -> Client:
        _quiet_asyncua()
        conn = self.config.connection
        timeout = conn.timeout.total_seconds()
        client = Client(conn.endpoint, timeout=timeout, watchdog_intervall=timeout)
        client.session_timeout = round(conn.session_timeout.total_seconds() * 1000)
        client.name = f"WellTegra edge agent ({self.config.name})"
        client.description = client.name
        client.product_uri = "urn:welltegra:edge-agent"
        client.application_uri = f"urn:{socket.gethostname()}:welltegra:edge-agent"
        if conn.username is not None and conn.password is not None:
            client.set_user(conn.username)
            client.set_password(conn.password.get_secret_value())
        if conn.security_mode != "None":
            await self._secure(client)
        client.connection_lost_callback = self._on_connection_lost
        try:
            await client.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), timeout)
            raise
        return client

    async def _secure(self, client: Client) -> None:
        conn = self.config.connection
        certificate, key, uri, created = await asyncio.to_thread(
            ensure_client_certificate, conn.certificate_dir
        )
        self._client_certificate = certificate
        if created:
            mine = await asyncio.to_thread(_load_certificate, certificate)
            log.warning(
                "opcua %s: generated the agent's client certificate %s (SHA-1 thumbprint %s, "
                "application URI %s): the server must trust it",
                self.config.name, certificate, _thumbprint(mine), uri,
            )
        client.application_uri = uri
        policy, mode = _POLICIES[conn.security_policy], _MODES[conn.security_mode]
        # GetEndpoints (unsecured, as every client does first) says early and clearly what is
        # wrong; the secure channel and CreateSession then prove the server holds the key.
        offered = await client.connect_and_get_server_endpoints()
        matching = [
            e for e in offered if e.SecurityMode == mode and e.SecurityPolicyUri == policy.URI
        ]
        if not matching:
            kinds = sorted(
                {f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in offered}
            )
            raise CollectorError(
                f"{conn.endpoint}: the server offers no endpoint with {conn.security_mode} and "
                f"{conn.security_policy} (it offers {', '.join(kinds) or 'none'})",
                retryable=False,
            )
        server_der = _first_certificate(matching[0].ServerCertificate or b"")
        try:
            server = x509.load_der_x509_certificate(server_der)
        except ValueError as exc:
            raise CollectorError(
                f"{conn.endpoint}: the server's endpoint has no valid certificate"
            ) from exc
        if conn.server_certificate is not None:
            try:
                pinned = await asyncio.to_thread(_load_certificate, conn.server_certificate)
            except (OSError, ValueError) as exc:
                raise CollectorError(
                    f"server_certificate {conn.server_certificate} cannot be read: {exc}",
                    retryable=False,
                ) from exc
            if pinned != server:
                raise CollectorError(
                    f"{conn.endpoint}: the server's certificate (SHA-1 thumbprint "
                    f"{_thumbprint(server)}, subject {server.subject.rfc4514_string()}) is not "
                    f"the pinned {conn.server_certificate} "
                    f"(SHA-1 thumbprint {_thumbprint(pinned)})",
                    retryable=False,
                )
        else:
            assert self._trust is not None
            if not self._trust.directory.is_dir():
                raise CollectorError(
                    f"trust_dir {self._trust.directory} is not a directory", retryable=False
                )
            if not await asyncio.to_thread(self._trust.is_trusted, server):
                raise self._untrusted(server)
            client.certificate_validator = self._trust.validate
        await client.set_security(
            policy, str(certificate), str(key), server_certificate=server_der, mode=mode
        )

    @contextlib.asynccontextmanager
    async def _session(self) -> Any:
        try:
            client = await self._connect()
        except CollectorError:
            raise
        except (OSError, TimeoutError, UaError) as exc:
            raise self._failure(exc, connecting=True) from exc
        try:
            yield client
        except CollectorError:
            raise
        except (OSError, TimeoutError, UaError) as exc:
            raise self._failure(exc, connecting=False) from exc
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    client.disconnect(), self.config.connection.timeout.total_seconds()
                )

    def _untrusted(self, certificate: x509.Certificate) -> CollectorError:
        assert self._trust is not None
        return CollectorError(
            f"{self.config.connection.endpoint}: the server's certificate (SHA-1 thumbprint "
            f"{_thumbprint(certificate)}, subject {certificate.subject.rfc4514_string()}) is not "
            f"trusted: put it, or the certificate of the CA that signed it, in "
            f"{self._trust.directory}",
            retryable=False,
        )

    def _failure(self, exc: BaseException, *, connecting: bool) -> CollectorError:
        """``exc`` (from asyncua or the socket) as a ``CollectorError`` that says what to do."""
        conn = self.config.connection
        endpoint = conn.endpoint
        if self._lost.is_set():
            return CollectorError(self._lost_reason)
        if self._trust is not None and self._trust.refused is not None:
            return self._untrusted(self._trust.refused)
        code = getattr(exc, "code", None)
        if isinstance(code, int):
            name = _status_text(code)
            if code in _CREDENTIALS_REFUSED:
                return CollectorError(
                    f"{endpoint}: the server refused user {conn.username!r} ({name})",
                    retryable=False,
                )
            if code in _CERTIFICATE_REFUSED and self._client_certificate is not None:
                return CollectorError(
                    f"{endpoint}: the server refused the agent's certificate ({name}): trust "
                    f"{self._client_certificate} on the server",
                )
            return CollectorError(f"{endpoint}: {name}: {ua.StatusCode(ua.UInt32(code)).doc}")
        text = str(exc) or type(exc).__name__
        if "Server certificate mismatch" in text:
            return CollectorError(
                f"{endpoint}: the server's certificate is not the pinned {conn.server_certificate}",
                retryable=False,
            )
        if "No matching endpoints" in text:
            return CollectorError(
                f"{endpoint}: the server offers no endpoint with {conn.security_mode} and "
                f"{conn.security_policy}",
                retryable=False,
            )
        if isinstance(exc, TimeoutError):
            seconds = conn.timeout.total_seconds()
            return CollectorError(f"{endpoint}: no answer within {seconds:g} s")
        if connecting and isinstance(exc, OSError):
            return CollectorError(f"cannot connect to {endpoint}: {text}")
        return CollectorError(f"{endpoint}: {text}")

    # --- tags ----------------------------------------------------------------------------------

    def _bad_tag(self, tag: OpcUaTag, reason: str) -> None:
        self.counts["bad_tag"] += 1
        self._bad_tags.append(f"{tag.node_id}: {reason}")
        log.error(
            "opcua %s: tag %s (%s of %s) left out: %s; the other tags go on",
            self.config.name, tag.node_id, tag.parameter, tag.well_id, reason,
        )

    def _warn_once(self, tag: _Tag, kind: str, message: str, *args: object) -> None:
        self.counts[kind] += 1
        if kind not in tag.warned:
            tag.warned.add(kind)
            log.warning("opcua %s: tag %s: " + message, self.config.name, tag.key, *args)

    async def _resolve(self, client: Client) -> list[_Tag]:
        """The usable tags, each with its node id on this server and its unit; the others are
        logged and counted."""
        namespaces: list[str] | None = None
        candidates: list[_Tag] = []
        for config in self.config.tags:
            node_id = ua.NodeId.from_string(config.node_id)
            uri = getattr(node_id, "NamespaceUri", None)
            if uri:
                if namespaces is None:
                    namespaces = list(await client.get_namespace_array())
                if uri not in namespaces:
                    self._bad_tag(config, f"the server has no namespace {uri!r}")
                    continue
                node_id = ua.NodeId(
                    node_id.Identifier, ua.Int16(namespaces.index(uri)), node_id.NodeIdType
                )
            candidates.append(
                _Tag(
                    config,
                    node_id,
                    poll=self.config.poll_seconds(config),
                    deadband=config.deadband
                    if config.deadband is not None
                    else self.config.deadband,
                )
            )
        if not candidates:
            return []
        values = await client.read_attributes(
            [client.get_node(t.node_id) for t in candidates], AttributeIds.Value
        )
        usable: list[_Tag] = []
        for tag, value in zip(candidates, values, strict=True):
            status = value.StatusCode
            if status is not None and status.value in _TAG_UNUSABLE:
                self._bad_tag(tag.config, f"{status.name}: {status.doc}")
                continue
            if tag.config.unit is not None:
                tag.unit = tag.config.unit
            else:
                unit = await self._engineering_unit(client, tag)
                if unit is None:
                    self._bad_tag(
                        tag.config,
                        "no unit: the node has no EngineeringUnits property; set unit in the "
                        "tag's configuration",
                    )
                    continue
                tag.unit = unit
                log.info(
                    "opcua %s: tag %s: unit %r from the node's EngineeringUnits",
                    self.config.name, tag.key, unit,
                )
            usable.append(tag)
        return usable

    async def _engineering_unit(self, client: Client, tag: _Tag) -> str | None:
        node = client.get_node(tag.node_id)
        try:
            properties = await node.get_children_descriptions(refs=ObjectIds.HasProperty)
        except UaStatusCodeError:
            return None
        for reference in properties:
            if reference.BrowseName.Name == "EngineeringUnits":
                try:
                    eu = await client.get_node(reference.NodeId).read_value()
                except UaStatusCodeError:
                    return None
                return unit_from_eu(eu) if isinstance(eu, ua.EUInformation) else None
        return None

    # --- readings and watermarks ---------------------------------------------------------------

    def _reading(self, tag: _Tag, value: ua.DataValue) -> Reading | None:
        """The reading of one data value of ``tag``, or None when it is skipped (see the module
        docstring). A value moves the tag's ``latest``; a status without a value (sent for the
        transform to count) does not, so history older than it can still be read."""
        instant = _utc(value.SourceTimestamp) or _utc(value.ServerTimestamp)
        if instant is None:
            instant = datetime.now(UTC)
            self._warn_once(
                tag, "no_timestamp", "values come without timestamps; using the agent's clock"
            )
        if tag.latest is not None and instant <= tag.latest:
            if instant == tag.latest:
                self.counts["repeated"] += 1  # a poll of an unchanged value, a re-read
            else:
                self._warn_once(
                    tag,
                    "out_of_order",
                    "a value's source timestamp went back (%s after %s): values not newer than "
                    "the last one taken are skipped as already delivered",
                    instant.isoformat(), tag.latest.isoformat(),
                )
            return None
        number = _number(value.Value)
        if isinstance(number, _NotNumeric):
            self._warn_once(
                tag, "not_numeric", "its values are %s, not numbers; skipped", number.kind
            )
            return None
        if number is None:
            if instant == tag.empty_at:
                self.counts["repeated"] += 1
                return None
            tag.empty_at = instant
        else:
            tag.latest = instant
        config = tag.config
        return Reading(
            config.well_id, config.parameter, instant, number, tag.unit,
            quality_of(value.StatusCode), config.node_id,
        )

    async def _emit(self, sink: ReadingSink, taken: Sequence[tuple[_Tag, Reading]]) -> None:
        """Emit in chunks, each with the watermark of every tag with a value in it."""
        for start in range(0, len(taken), CHUNK_READINGS):
            chunk = taken[start : start + CHUNK_READINGS]
            latest: dict[str, datetime] = {}
            for tag, reading in chunk:
                known = latest.get(tag.key)
                if reading.value is not None and (known is None or reading.timestamp > known):
                    latest[tag.key] = reading.timestamp
            await sink.emit(
                [reading for _, reading in chunk],
                {key: instant.isoformat() for key, instant in latest.items()},
            )

    async def _load_watermarks(self, sink: ReadingSink, tags: Iterable[_Tag]) -> None:
        for tag in tags:
            stored = await sink.watermark(tag.key)
            if stored is None:
                continue
            try:
                tag.latest = _utc(datetime.fromisoformat(stored))
            except ValueError:
                log.warning(
                    "opcua %s: tag %s: watermark %r is not a timestamp; ignored",
                    self.config.name, tag.key, stored,
                )

    # --- history -------------------------------------------------------------------------------

    async def _backfill(self, client: Client, sink: ReadingSink, tags: Iterable[_Tag]) -> None:
        """Raw history of each tag from its watermark on, page by page, emitted as read."""
        config = self.config
        for tag in tags:
            if tag.latest is None:
                continue
            start = tag.latest
            earliest = datetime.now(UTC) - config.backfill_limit
            if start < earliest:
                log.warning(
                    "opcua %s: tag %s: watermark %s is older than backfill_limit (%s); values "
                    "from then to %s are not read",
                    config.name, tag.key, start.isoformat(), config.backfill_limit,
                    earliest.isoformat(),
                )
                start = earliest
            total = await self._history(client, sink, tag, start)
            if total:
                log.info(
                    "opcua %s: tag %s: %d values from the server's history since %s",
                    config.name, tag.key, total, start.isoformat(),
                )

    async def _history(self, client: Client, sink: ReadingSink, tag: _Tag, start: datetime) -> int:
        node = client.get_node(tag.node_id)
        page = self.config.history_page_size
        continuation: bytes | None = None
        total = 0
        while True:
            details = ua.ReadRawModifiedDetails(
                IsReadModified=False,
                StartTime=start,
                EndTime=ua.get_win_epoch(),  # unspecified: up to the newest value
                NumValuesPerNode=page,
                ReturnBounds=False,
            )
            result = await node.history_read(details, continuation)
            if result.StatusCode is not None and not result.StatusCode.is_good():
                self._warn_once(
                    tag,
                    "no_history",
                    "no history (%s): values since its watermark %s cannot be filled in",
                    result.StatusCode.name, start.isoformat(),
                )
                return total
            values = list(getattr(result.HistoryData, "DataValues", None) or [])
            taken = [(tag, r) for v in values if (r := self._reading(tag, v)) is not None]
            if taken:
                await self._emit(sink, taken)
                total += len(taken)
            continuation = result.ContinuationPoint
            if continuation:
                continue
            if len(values) < page:
                return total
            # A full page without a continuation point: ask again from its newest timestamp.
            newest = max((_utc(v.SourceTimestamp) or start for v in values), default=start)
            if newest <= start:
                log.warning(
                    "opcua %s: tag %s: more than %d history values at %s; the rest is skipped",
                    self.config.name, tag.key, page, start.isoformat(),
                )
                return total
            start = newest

    # --- subscription and polling --------------------------------------------------------------

    async def _subscribe(
        self, client: Client, tags: list[_Tag]
    ) -> tuple[Subscription, dict[int, _Tag], float]:
        """One subscription with a monitored item per tag (refused ones are logged, counted and
        left out); the handle → tag map and the silence after which the session is lost."""
        config = self.config
        interval_ms = config.publishing_interval.total_seconds() * 1000
        lifetime = max(
            3 * config.keepalive_count,
            math.ceil(_MIN_LIFETIME.total_seconds() * 1000 / interval_ms),
        )
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval_ms,
            RequestedLifetimeCount=lifetime,
            RequestedMaxKeepAliveCount=config.keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        # Our own Subscription, not client.create_subscription: asyncua would otherwise recreate
        # it by itself when stale, silently, where this collector restarts and fills the gap.
        subscription = Subscription(
            client.uaclient.session,
            params,
            None,
            queue_maxsize=NOTIFICATION_QUEUE,
            overflow=OverflowPolicy.DISCONNECT,
        )
        subscription.set_overflow_disconnect_handler(
            lambda: self._lose(
                f"more than {NOTIFICATION_QUEUE} notifications waited for the buffer: the agent "
                "could not keep up"
            )
        )
        created = await subscription.init()
        revised_ms = float(created.RevisedPublishingInterval or interval_ms)
        keepalive = int(created.RevisedMaxKeepAliveCount or config.keepalive_count)
        silence = max(config.watchdog_intervals, keepalive + 2) * revised_ms / 1000

        by_handle: dict[int, _Tag] = {}
        pending = list(enumerate(tags, start=1))
        with_filter = True
        while pending:
            requests = [self._monitored_item(handle, tag, with_filter) for handle, tag in pending]
            results = await subscription.create_monitored_items(requests)
            retry: list[tuple[int, _Tag]] = []
            for (handle, tag), result in zip(pending, results, strict=True):
                if not isinstance(result, ua.StatusCode):
                    by_handle[handle] = tag
                elif with_filter and result.value in _FILTER_REFUSED and tag.deadband is None:
                    retry.append((handle, tag))
                else:
                    self._bad_tag(tag.config, f"cannot subscribe: {result.name}: {result.doc}")
            if retry:
                log.info(
                    "opcua %s: the server refused the data change filter of %d tags; they are "
                    "subscribed without it (timestamp-only changes are not reported)",
                    config.name, len(retry),
                )
            pending, with_filter = retry, False
        return subscription, by_handle, silence

    def _monitored_item(
        self, handle: int, tag: _Tag, with_filter: bool
    ) -> ua.MonitoredItemCreateRequest:
        config = self.config
        sampling = (
            -1.0
            if config.sampling_interval is None
            else config.sampling_interval.total_seconds() * 1000
        )
        parameters = ua.MonitoringParameters(
            ClientHandle=handle,
            SamplingInterval=sampling,
            QueueSize=config.queue_size,
            DiscardOldest=True,
        )
        if with_filter:
            parameters.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValueTimestamp,
                DeadbandType=ua.DeadbandType.Absolute.value
                if tag.deadband is not None
                else ua.DeadbandType.None_.value,
                DeadbandValue=tag.deadband or 0.0,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=tag.node_id, AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=parameters,
        )

    async def _read_notifications(
        self, subscription: Subscription, by_handle: dict[int, _Tag], outbox: _Outbox
    ) -> None:
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                tag = by_handle.get(event.data.monitored_item.ClientHandle)
                value = event.data.monitored_item.Value
                if tag is None or value is None:
                    continue
                if value.StatusCode is not None and value.StatusCode.value & 0x480 == 0x480:
                    self._warn_once(
                        tag, "queue_overflow",
                        "the server's queue of this monitored item overflowed and dropped values: "
                        "raise queue_size or sampling_interval",
                    )
                reading = self._reading(tag, value)
                if reading is not None:
                    await outbox.put(tag, reading)
            elif isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                if self._lost.is_set():
                    raise CollectorError(self._lost_reason)
                if status is not None and not status.is_good():
                    raise CollectorError(
                        f"{self.config.connection.endpoint}: the server ended the subscription "
                        f"({status.name})"
                    )
        raise CollectorError(f"{self.config.connection.endpoint}: the subscription was closed")

    async def _emit_notifications(self, sink: ReadingSink, outbox: _Outbox) -> None:
        """Emit what the outbox holds as soon as it holds it. An emit returns when its batch is
        sealed (up to the buffer's linger): waiting for one before starting the next would make
        notifications wait for a linger twice. The sink appends each emit's readings, with their
        watermarks, to the open batch at once and in call order, so a few may be in flight."""
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                taken = await outbox.take()
                while len(in_flight) >= EMITS_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight = _reap(in_flight)
                in_flight.add(asyncio.create_task(self._emit(sink, taken)))
                # Let the new emit reach the buffer before anything else is taken.
                await asyncio.sleep(0)
                in_flight = _reap(in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _watch(self, subscription: Subscription, silence: float) -> None:
        """Raise when neither data nor a keep-alive came for ``silence`` seconds."""
        since = time.monotonic()
        check = min(max(silence / 10, 0.05), 1.0)
        while True:
            await asyncio.sleep(check)
            last = subscription.last_publish_at or since
            quiet = time.monotonic() - max(last, since)
            if quiet > silence:
                raise CollectorError(
                    f"{self.config.connection.endpoint}: the session is connected but silent: "
                    f"neither data nor a keep-alive for {quiet:.1f} s "
                    f"({self.config.watchdog_intervals} publishing intervals)"
                )

    async def _poll(
        self, client: Client, sink: ReadingSink, tags: list[_Tag], interval: float
    ) -> None:
        parameters = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Both)
        for tag in tags:
            parameters.NodesToRead.append(
                ua.ReadValueId(NodeId=tag.node_id, AttributeId=AttributeIds.Value)
            )
        due = time.monotonic()
        while True:
            values = await client.uaclient.read(parameters)
            taken: list[tuple[_Tag, Reading]] = []
            for tag, value in zip(tags, values, strict=True):
                status = value.StatusCode
                if status is not None and status.value in _TAG_UNUSABLE:
                    self._warn_once(tag, "unreadable", "cannot be read now: %s", status.name)
                    continue
                reading = self._reading(tag, value)
                if reading is not None:
                    taken.append((tag, reading))
            if taken:
                await self._emit(sink, taken)
            due += interval
            now = time.monotonic()
            if due < now:
                due = now  # late: the missed polls are not made up
            await asyncio.sleep(due - now)

    async def _wait_lost(self) -> None:
        await self._lost.wait()
        raise CollectorError(self._lost_reason)

    # --- Collector -----------------------------------------------------------------------------

    async def run(self, sink: ReadingSink) -> None:
        """Connect, resolve, backfill, then subscribe and poll until cancelled."""
        config = self.config
        async with self._session() as client:
            tags = await self._resolve(client)
            if not tags:
                raise CollectorError(
                    f"{config.connection.endpoint}: none of the {len(config.tags)} tags can be "
                    "read (see the errors above)"
                )
            await self._load_watermarks(sink, tags)
            await self._backfill(client, sink, tags)
            polled = [t for t in tags if t.poll is not None]
            subscribed = [t for t in tags if t.poll is None]
            by_handle: dict[int, _Tag] = {}
            if subscribed:
                subscription, by_handle, silence = await self._subscribe(client, subscribed)
                # What changed between the backfill and the subscription's first values.
                await self._backfill(client, sink, by_handle.values())
            if not by_handle and not polled:
                raise CollectorError(
                    f"{config.connection.endpoint}: none of the {len(config.tags)} tags can be "
                    "subscribed (see the errors above)"
                )
            log.info(
                "opcua %s: %s: %d tags subscribed, %d polled, %d left out",
                config.name, config.connection.endpoint, len(by_handle), len(polled),
                len(config.tags) - len(by_handle) - len(polled),
            )
            jobs: list[Awaitable[None]] = [self._wait_lost()]
            if by_handle:
                outbox = _Outbox(PENDING_READINGS)
                jobs += [
                    self._read_notifications(subscription, by_handle, outbox),
                    self._emit_notifications(sink, outbox),
                    self._watch(subscription, silence),
                ]
            groups: dict[float, list[_Tag]] = {}
            for tag in polled:
                groups.setdefault(tag.poll or 0.0, []).append(tag)
            jobs += [self._poll(client, sink, group, every) for every, group in groups.items()]
            await _first_failure(jobs)

    async def probe(self) -> str:
        """Connect once, read the server's build info and every tag's value; say what was found,
        or raise ``CollectorError`` naming the tags that cannot be read."""
        config, conn = self.config, self.config.connection
        async with self._session() as client:
            build = await client.get_node(ObjectIds.Server_ServerStatus_BuildInfo).read_value()
            state = await client.get_node(ObjectIds.Server_ServerStatus_State).read_value()
            tags = await self._resolve(client)
        if self._bad_tags:
            shown = "; ".join(self._bad_tags[:3])
            more = f"; and {len(self._bad_tags) - 3} more" if len(self._bad_tags) > 3 else ""
            raise CollectorError(
                f"{conn.endpoint}: {len(self._bad_tags)} of {len(config.tags)} tags cannot be "
                f"read: {shown}{more}",
                retryable=False,
            )
        security = (
            "no security"
            if conn.security_mode == "None"
            else f"{conn.security_policy}/{conn.security_mode}"
        )
        user = f"user {conn.username}" if conn.username else "anonymous"
        product = f"{getattr(build, 'ProductName', '?')} {getattr(build, 'SoftwareVersion', '')}"
        with contextlib.suppress(ValueError, TypeError):
            state = ua.ServerState(state)
        state_name = getattr(state, "name", str(state))
        return (
            f"{conn.endpoint}: {security}, {user}; server {product.strip()} ({state_name}); "
            f"{len(tags)} tags readable"
        )


def _reap(tasks: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
    """The tasks still running; raises the error of one that failed."""
    for task in tasks:
        if task.done():
            task.result()
    return {task for task in tasks if not task.done()}


def _quiet_asyncua() -> None:
    # asyncua logs every publish response at INFO: one line per data change. Unless configured
    # otherwise, only its warnings reach the agent's log.
    library = logging.getLogger("asyncua")
    if library.level == logging.NOTSET:
        library.setLevel(logging.WARNING)


async def _first_failure(jobs: Sequence[Awaitable[None]]) -> None:
    """Run ``jobs`` until the first one ends; re-raise its error (each runs for ever unless it
    fails), cancel the others."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise CollectorError("a collector task ended by itself")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

