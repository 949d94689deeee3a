"""The ``opcua`` collector against a real asyncua ``Server`` in this process, on a free loopback
port, with SignAndEncrypt (Basic256Sha256 unless a test says otherwise), a user checked by a user
manager, and history kept in SQLite so that it survives a server restart.

``OpcUaTestServer`` is also what the end-to-end test and nothing else uses: variables with
numeric node ids (asyncua's SQLite history cannot name a table after a string id), historized,
some with EngineeringUnits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.history_sql import HistorySQLite
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge.collectors.base import CollectorError
from edge.collectors.opcua import (
    CLIENT_CERTIFICATE_FILE,
    CLIENT_KEY_FILE,
    OpcUaCollector,
    OpcUaConfig,
    quality_of,
    unit_from_eu,
)
from edge.config import AgentConfigError, load_agent_config
from edge.readings import Quality
from tests import collector_support as support
from tests.collector_support import free_port, running

NAMESPACE = "urn:welltegra:test:opcua"
USER, PASSWORD = "operator", "s3cret-pass"


def _stamp(at: datetime) -> ua.DateTime:
    return cast(ua.DateTime, at)  # asyncua's DateTime is a datetime by another name


@dataclass(frozen=True)
class Variable:
    """A variable of the test server: numeric id in the test namespace (ns=2)."""

    number: int
    name: str
    variant: ua.VariantType = ua.VariantType.Double
    eu: ua.EUInformation | None = None

    @property
    def node_id(self) -> str:
        return f"ns=2;i={self.number}"


def eu(display: str, code: str = "") -> ua.EUInformation:
    unit_id = int.from_bytes(code.encode(), "big") if code else -1
    return ua.EUInformation(
        NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
        UnitId=unit_id,
        DisplayName=ua.LocalizedText(display),
        Description=ua.LocalizedText(display),
    )


VARIABLES = (
    Variable(1001, "WHP_WELL_001"),
    Variable(1002, "HL_WELL_001"),
    Variable(1003, "FLOW_WELL_001"),
    Variable(1004, "TEMP_WELL_001", eu=eu("°F", "FAH")),
    Variable(1005, "PRESS_BAR", eu=eu("", "BAR")),
    Variable(1006, "PUMP_RUNNING", ua.VariantType.Boolean),
    Variable(1007, "OPERATOR_NOTE", ua.VariantType.String),
)
BY_NAME = {v.name: v for v in VARIABLES}
_ZERO: dict[ua.VariantType, Any] = {
    ua.VariantType.Double: 0.0,
    ua.VariantType.Boolean: False,
    ua.VariantType.String: "",
}


@dataclass
class Pki:
    """The server's certificate and key, and a second certificate nobody trusts."""

    directory: Path
    certificate: Path
    key: Path
    stranger: Path


def _self_signed(directory: Path, stem: str, uri: str) -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        stem,
        {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=30,
    )
    certificate_path, key_path = directory / f"{stem}.der", directory / f"{stem}.key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return certificate_path, key_path


def make_pki(directory: Path) -> Pki:
    """The test server's certificate and key, and a stranger's certificate, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    certificate, key = _self_signed(directory, "server", "urn:welltegra:test:server")
    stranger, _ = _self_signed(directory, "stranger", "urn:welltegra:test:stranger")
    return Pki(directory, certificate, key, stranger)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("opcua-pki"))


class _Users:
    """asyncua's user manager interface: one operator with a password."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


@dataclass
class OpcUaTestServer:
    """An asyncua server on a fixed loopback port that a test may stop and start again; its
    history (SQLite) and its variables' last values survive a restart."""

    directory: Path
    pki: Pki
    policies: Sequence[ua.SecurityPolicyType] = (
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    )
    users: Mapping[str, str] = field(default_factory=lambda: {USER: PASSWORD})
    port: int = field(default_factory=free_port)
    server: Server | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    last: dict[str, ua.DataValue] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/welltegra/"

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        server = Server(user_manager=_Users(self.users))  # type: ignore[arg-type]
        # Before init(), which initialises the storage.
        server.iserver.history_manager.set_storage(HistorySQLite(str(self.directory / "h.db")))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("WellTegra test server")
        await server.set_application_uri("urn:welltegra:test:server")
        server.set_security_policy(list(self.policies))
        server.set_identity_tokens([ua.UserNameIdentityToken])
        await server.load_certificate(str(self.pki.certificate))
        await server.load_private_key(str(self.pki.key))
        index = await server.register_namespace(NAMESPACE)
        assert index == 2
        well = await server.nodes.objects.add_object(
            ua.NodeId.from_string("ns=2;i=1000"), "WELL_001"
        )
        for variable in VARIABLES:
            node = await well.add_variable(
                ua.NodeId.from_string(variable.node_id),
                variable.name,
                ua.Variant(_ZERO[variable.variant], variable.variant),
            )
            if variable.eu is not None:
                await node.add_property(0, "EngineeringUnits", variable.eu)
            # Before any device value: no value, BadWaitingForInitialData, as real servers start.
            initial = self.last.get(variable.name) or ua.DataValue(
                ua.Variant(None, ua.VariantType.Null),
                StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadWaitingForInitialData)),
                SourceTimestamp=_stamp(datetime.now(UTC)),
                ServerTimestamp=_stamp(datetime.now(UTC)),
            )
            await node.write_value(initial)
            self.nodes[variable.name] = node
        await server.start()
        for variable in VARIABLES:
            await server.historize_node_data_change(
                self.nodes[variable.name], period=timedelta(days=1)
            )
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def write(
        self,
        name: str,
        value: Any,
        at: datetime,
        status: int = StatusCodes.Good,
    ) -> None:
        variable = BY_NAME[name]
        data = ua.DataValue(
            ua.Variant(value, variable.variant),
            StatusCode=ua.StatusCode(ua.UInt32(status)),
            SourceTimestamp=_stamp(at),
            ServerTimestamp=_stamp(datetime.now(UTC)),
        )
        await self.nodes[name].write_value(data)
        self.last[name] = data

    async def historized(self, name: str, at: datetime) -> None:
        """Wait until the value of ``name`` at ``at`` is in the history (it is stored by the
        server's own subscription, every 10 ms)."""
        node = self.nodes[name]

        async def stored() -> bool:
            values = await node.read_raw_history(at - timedelta(microseconds=1), None, 0)
            # The server's own reads give naive UTC timestamps.
            return any(v.SourceTimestamp == at.replace(tzinfo=None) for v in values)

        await until(stored)

    def silence(self) -> None:
        """Stop every client subscription's publish loop: no data, no keep-alive, the
        connection itself stays up."""
        assert self.server is not None
        for subscription in self.server.iserver.subscription_service.subscriptions.values():
            if subscription.pub_request_callback is not None and subscription._task is not None:
                subscription._task.cancel()


@pytest.fixture
async def opcua_server(tmp_path: Path, pki: Pki) -> AsyncIterator[OpcUaTestServer]:
    server = OpcUaTestServer(tmp_path / "server", pki)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def source(
    server: OpcUaTestServer,
    directory: Path,
    tags: Sequence[Mapping[str, Any]],
    connection: Mapping[str, Any] | None = None,
    **keys: Any,
) -> OpcUaConfig:
    """An opcua source of ``server`` with SignAndEncrypt, the user, the pinned certificate."""
    return OpcUaConfig.model_validate(
        {
            "name": "scada",
            "type": "opcua",
            "connection": {
                "endpoint": server.endpoint,
                "security_mode": "SignAndEncrypt",
                "security_policy": "Basic256Sha256",
                "username": USER,
                "password": PASSWORD,
                "certificate_dir": str(directory / "pki"),
                "server_certificate": str(server.pki.certificate),
                "timeout": "5s",
                **(connection or {}),
            },
            "publishing_interval": "50ms",
            **keys,
            "tags": list(tags),
        }
    )


def tag(name: str, parameter: str, unit: str | None = None, **keys: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "node_id": BY_NAME[name].node_id,
        "parameter": parameter,
        "well_id": "WELL-001",
        **keys,
    }
    if unit is not None:
        entry["unit"] = unit
    return entry


class MemorySink(support.MemorySink):
    """The shared in-memory sink, with each node's values."""

    def values(self, node_id: str) -> list[tuple[datetime, float]]:
        """(timestamp, value) of ``node_id``'s readings that have a value, in emitted order."""
        return [
            (r.timestamp, r.value)
            for r in self.readings
            if r.tag == node_id and r.value is not None
        ]


async def until(predicate: Callable[[], Any], timeout: float = 15.0) -> None:
    """Poll ``predicate`` (sync or async) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


@dataclass
class Supervisor:
    """What the agent does with a collector, in small: build and run it, and after a failure
    wait for ``gate`` (the backoff) and start a new one; failures are kept."""

    config: OpcUaConfig
    sink: MemorySink
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    failures: list[CollectorError] = field(default_factory=list)
    starts: int = 0

    async def run(self) -> None:
        self.gate.set()
        while True:
            await self.gate.wait()
            self.starts += 1
            try:
                await self.config.build().run(self.sink)
            except CollectorError as exc:
                self.failures.append(exc)
            await asyncio.sleep(0.05)


def base_time() -> datetime:
    # Whole milliseconds and a half: exact in OPC UA's 100 ns ticks, and never on a whole
    # second, which asyncua's SQLite history stores as text without a fraction and then cannot
    # read back (sqlite3's timestamp converter).
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000 + 500)


# --- values --------------------------------------------------------------------------------------


async def test_values_arrive_over_sign_and_encrypt_with_a_user(
    opcua_server: OpcUaTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [
            tag("WHP_WELL_001", "wellhead_pressure", "psi"),
            tag("HL_WELL_001", "hookload", "klbs", well_id="WELL-002"),
            tag("PUMP_RUNNING", "pump_running", "1"),
            tag("OPERATOR_NOTE", "note", "1"),
        ],
    )
    collector = OpcUaCollector(config)
    sink = MemorySink()
    t0 = base_time()
    whp = [(t0 + timedelta(milliseconds=10 * i), 2_000.0 + i) for i in range(20)]
    async with running(collector, sink):
        await until(lambda: len(sink.readings) >= 4)  # the initial BadWaitingForInitialData
        for at, value in whp:
            await opcua_server.write("WHP_WELL_001", value, at)
        await opcua_server.write("HL_WELL_001", 210.5, t0, StatusCodes.UncertainLastUsableValue)
        await opcua_server.write("HL_WELL_001", 0.0, t0 + timedelta(seconds=1), StatusCodes.Bad)
        await opcua_server.write("PUMP_RUNNING", True, t0)
        await opcua_server.write("PUMP_RUNNING", False, t0 + timedelta(seconds=1))
        await opcua_server.write("OPERATOR_NOTE", "tripping out", t0)
        await opcua_server.write("OPERATOR_NOTE", "back to drilling", t0 + timedelta(seconds=1))
        await until(lambda: len(sink.values("ns=2;i=1001")) == 20)
        # A value older than the last one taken (a source clock stepping back): skipped, said.
        await opcua_server.write("WHP_WELL_001", 1.0, t0 - timedelta(seconds=1))
        await until(lambda: collector.counts["out_of_order"] == 1)
        await until(lambda: len(sink.values("ns=2;i=1006")) == 2)
        await until(lambda: len([r for r in sink.readings if r.tag == "ns=2;i=1002"]) == 3)

    # Every value written, once, in order, with the source's timestamps.
    assert sink.values("ns=2;i=1001") == whp
    hookload = [r for r in sink.readings if r.tag == "ns=2;i=1002" and r.timestamp >= t0]
    # The server sends no value with a Bad status: sent without one, as BAD.
    assert [(r.well_id, r.parameter, r.unit, r.value, r.quality) for r in hookload] == [
        ("WELL-002", "hookload", "klbs", 210.5, Quality.UNCERTAIN),
        ("WELL-002", "hookload", "klbs", None, Quality.BAD),
    ]
    assert sink.values("ns=2;i=1006") == [(t0, 1.0), (t0 + timedelta(seconds=1), 0.0)]
    # The initial values had none (BadWaitingForInitialData): sent as such, the transform
    # counts and drops them.
    initial = [r for r in sink.readings if r.value is None]
    assert {r.tag for r in initial} >= {"ns=2;i=1001", "ns=2;i=1002"}
    assert all(r.quality is Quality.BAD for r in initial)
    # Text is no number: skipped, one warning for the tag, however many values.
    assert sink.values("ns=2;i=1007") == []
    assert collector.counts["not_numeric"] == 2
    warnings = [r for r in caplog.records if "ns=2;i=1007" in r.getMessage()]
    assert len(warnings) == 1 and "not numbers" in warnings[0].getMessage()
    assert "source timestamp went back" in caplog.text
    # The watermark of each tag is the source timestamp of its last value.
    assert sink.watermarks["ns=2;i=1001"] == whp[-1][0].isoformat()
    # The agent's certificate was generated, its key kept private.
    key = tmp_path / "pki" / CLIENT_KEY_FILE
    assert (tmp_path / "pki" / CLIENT_CERTIFICATE_FILE).exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


async def test_a_node_that_does_not_exist_is_reported_and_the_others_go_on(
    opcua_server: OpcUaTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = {"node_id": "ns=2;i=9999", "parameter": "hookload", "well_id": "W", "unit": "klbs"}
    unknown_namespace = {
        "node_id": "nsu=urn:nowhere;i=1",
        "parameter": "flow_rate",
        "well_id": "W",
        "unit": "bbl/day",
    }
    by_uri = {
        "node_id": f"nsu={NAMESPACE};i=1003",
        "parameter": "flow_rate",
        "well_id": "WELL-001",
        "unit": "bbl/day",
    }
    config = source(
        opcua_server,
        tmp_path,
        [missing, tag("WHP_WELL_001", "wellhead_pressure", "psi"), unknown_namespace, by_uri],
    )
    collector = OpcUaCollector(config)
    sink = MemorySink()
    t0 = base_time()
    with caplog.at_level(logging.INFO, logger="edge.collectors.opcua"):
        async with running(collector, sink) as task:
            await until(lambda: len(sink.readings) >= 2)
            await opcua_server.write("WHP_WELL_001", 1_500.0, t0)
            await opcua_server.write("FLOW_WELL_001", 900.0, t0)
            await until(lambda: sink.values("ns=2;i=1001") == [(t0, 1_500.0)])
            await until(lambda: sink.values(by_uri["node_id"]) == [(t0, 900.0)])
            assert not task.done()
    assert collector.counts["bad_tag"] == 2
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert len(errors.splitlines()) == 2, errors
    assert "tag ns=2;i=9999 (hookload of W) left out: BadNodeIdUnknown" in errors
    assert "tag nsu=urn:nowhere;i=1 (flow_rate of W) left out: the server has no namespace" in (
        errors
    )
    assert errors.count("the other tags go on") == 2


async def test_no_readable_tag_at_all_is_a_collector_error(
    opcua_server: OpcUaTestServer, tmp_path: Path
) -> None:
    missing = {"node_id": "ns=2;i=9999", "parameter": "hookload", "well_id": "W", "unit": "klbs"}
    collector = OpcUaCollector(source(opcua_server, tmp_path, [missing]))
    with pytest.raises(CollectorError, match="none of the 1 tags can be read"):
        await collector.run(MemorySink())


# --- restarts and history -------------------------------------------------------------------------


async def test_a_server_restart_resumes_and_the_gap_is_filled_from_history(
    opcua_server: OpcUaTestServer, tmp_path: Path
) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [tag("WHP_WELL_001", "wellhead_pressure", "psi"), tag("HL_WELL_001", "hookload", "klbs")],
    )
    sink = MemorySink()
    supervisor = Supervisor(config, sink)
    # Timestamps ahead of the server's start, as a server's values are (asyncua's SQLite history
    # returns values in the order they were stored, which is then also time order).
    t0 = base_time() + timedelta(seconds=1)
    before = [(t0 + timedelta(milliseconds=100 * i), 100.0 + i) for i in range(5)]
    gap = [(t0 + timedelta(seconds=10, milliseconds=100 * i), 200.0 + i) for i in range(5)]
    after = [(t0 + timedelta(seconds=20, milliseconds=100 * i), 300.0 + i) for i in range(5)]
    task = asyncio.create_task(supervisor.run())
    try:
        await until(lambda: len(sink.readings) >= 2)
        for at, value in before:
            await opcua_server.write("WHP_WELL_001", value, at)
            await opcua_server.write("HL_WELL_001", value, at)
        await until(lambda: len(sink.values("ns=2;i=1002")) == 5)

        supervisor.gate.clear()  # the agent's backoff: it reconnects when the test says so
        await opcua_server.stop()
        await until(lambda: len(supervisor.failures) == 1)
        await opcua_server.start()
        # Written while the collector is away: a subscription alone would only see the last.
        for at, value in gap:
            await opcua_server.write("WHP_WELL_001", value, at)
            await opcua_server.write("HL_WELL_001", value, at)
        await opcua_server.historized("HL_WELL_001", gap[-1][0])
        supervisor.gate.set()
        await until(lambda: len(sink.values("ns=2;i=1002")) == 10)
        for at, value in after:
            await opcua_server.write("WHP_WELL_001", value, at)
            await opcua_server.write("HL_WELL_001", value, at)
        await until(lambda: len(sink.values("ns=2;i=1002")) == 15)
        await until(lambda: len(sink.values("ns=2;i=1001")) == 15)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert supervisor.starts == 2
    assert "connection to" in str(supervisor.failures[0]) and "was lost" in str(
        supervisor.failures[0]
    )
    for node_id in ("ns=2;i=1001", "ns=2;i=1002"):
        # Every value exactly once, in time order: nothing lost, nothing read twice.
        assert sink.values(node_id) == before + gap + after
    # What the gateway would store: no identity twice. (Statuses without a value, which the
    # transform drops, may come again after a restart: they set no watermark.)
    identities = [(r.tag, r.timestamp) for r in sink.readings if r.value is not None]
    assert len(identities) == len(set(identities))


async def test_a_collector_restart_backfills_what_was_written_while_it_was_down(
    opcua_server: OpcUaTestServer, tmp_path: Path
) -> None:
    config = source(opcua_server, tmp_path, [tag("WHP_WELL_001", "wellhead_pressure", "psi")])
    sink = MemorySink()
    t0 = base_time() + timedelta(seconds=1)
    first = [(t0 + timedelta(seconds=i), 10.0 + i) for i in range(3)]
    # More than one page of history (history_page_size 7), to page through it.
    missed = [(t0 + timedelta(seconds=10 + i), 20.0 + i) for i in range(17)]
    async with running(OpcUaCollector(config), sink):
        await until(lambda: len(sink.readings) >= 1)  # subscribed: its first value came
        for at, value in first:
            await opcua_server.write("WHP_WELL_001", value, at)
        await until(lambda: len(sink.values("ns=2;i=1001")) == 3)
    for at, value in missed:
        await opcua_server.write("WHP_WELL_001", value, at)
    await opcua_server.historized("WHP_WELL_001", missed[-1][0])
    paged = config.model_copy(update={"history_page_size": 7})
    async with running(OpcUaCollector(paged), sink):
        await until(lambda: len(sink.values("ns=2;i=1001")) == 20)
        await asyncio.sleep(0.2)  # nothing more comes
    assert sink.values("ns=2;i=1001") == first + missed
    assert sink.watermarks["ns=2;i=1001"] == missed[-1][0].isoformat()


async def test_a_silent_session_is_treated_as_lost(
    opcua_server: OpcUaTestServer, tmp_path: Path
) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [tag("WHP_WELL_001", "wellhead_pressure", "psi")],
        keepalive_count=2,
        watchdog_intervals=12,
    )
    sink = MemorySink()
    collector = OpcUaCollector(config)
    task = asyncio.create_task(collector.run(sink))
    try:
        await until(lambda: len(sink.readings) >= 1)
        # Keep-alives flow while nothing changes: the session stays up past the watchdog's
        # 12 intervals.
        await asyncio.sleep(1.0)
        assert not task.done()
        opcua_server.silence()
        with pytest.raises(CollectorError, match="connected but silent"):
            await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, CollectorError):
            await task


# --- polling, deadband, units ---------------------------------------------------------------------


async def test_polling_reads_each_value_once(opcua_server: OpcUaTestServer, tmp_path: Path) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [tag("WHP_WELL_001", "wellhead_pressure", "psi"), tag("HL_WELL_001", "hookload", "klbs")],
        mode="poll",
        poll_interval="50ms",
    )
    collector = OpcUaCollector(config)
    sink = MemorySink()
    t0 = base_time()
    async with running(collector, sink):
        for i in range(3):
            await opcua_server.write("WHP_WELL_001", 50.0 + i, t0 + timedelta(seconds=i))
            await until(lambda i=i: len(sink.values("ns=2;i=1001")) == i + 1)  # type: ignore[misc]
        # Many polls of an unchanged value: read again, taken once.
        await until(lambda: collector.counts["repeated"] >= 10)
    assert sink.values("ns=2;i=1001") == [(t0 + timedelta(seconds=i), 50.0 + i) for i in range(3)]
    # One tag polled, the other polled too (mode: poll), in one Read per poll.
    assert {r.tag for r in sink.readings} == {"ns=2;i=1001", "ns=2;i=1002"}


async def test_a_tag_with_its_own_poll_interval_is_polled_beside_subscribed_ones(
    opcua_server: OpcUaTestServer, tmp_path: Path
) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [
            tag("WHP_WELL_001", "wellhead_pressure", "psi"),
            tag("HL_WELL_001", "hookload", "klbs", poll_interval=0.05),
        ],
    )
    sink = MemorySink()
    t0 = base_time()
    async with running(OpcUaCollector(config), sink):
        await until(lambda: len(sink.readings) >= 2)
        await opcua_server.write("WHP_WELL_001", 1.0, t0)
        await opcua_server.write("HL_WELL_001", 2.0, t0)
        await until(lambda: sink.values("ns=2;i=1001") == [(t0, 1.0)])
        await until(lambda: sink.values("ns=2;i=1002") == [(t0, 2.0)])


async def test_the_deadband_filter_is_honoured(
    opcua_server: OpcUaTestServer, tmp_path: Path
) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [
            tag("WHP_WELL_001", "wellhead_pressure", "psi", deadband=1.0),
            tag("HL_WELL_001", "hookload", "klbs"),  # no deadband: every change
        ],
    )
    sink = MemorySink()
    t0 = base_time()
    # A first value before subscribing: asyncua's server cannot apply a deadband to a change
    # from "no value" (it fails comparing with None).
    await opcua_server.write("WHP_WELL_001", 0.0, t0 - timedelta(seconds=1))
    await opcua_server.write("HL_WELL_001", 0.0, t0 - timedelta(seconds=1))
    series = [10.0, 10.2, 15.0, 15.3, 20.0]
    async with running(OpcUaCollector(config), sink):
        await until(lambda: len(sink.values("ns=2;i=1001")) == len(sink.values("ns=2;i=1002")) == 1)
        for i, value in enumerate(series):
            at = t0 + timedelta(seconds=i)
            await opcua_server.write("WHP_WELL_001", value, at)
            await opcua_server.write("HL_WELL_001", value, at)
        await until(lambda: len(sink.values("ns=2;i=1002")) == 6)
        await until(lambda: len(sink.values("ns=2;i=1001")) == 4)
        await asyncio.sleep(0.2)  # and no more
    assert [v for _, v in sink.values("ns=2;i=1001")] == [0.0, 10.0, 15.0, 20.0]
    assert [v for _, v in sink.values("ns=2;i=1002")] == [0.0, *series]


async def test_engineering_units_are_used_when_the_config_gives_none(
    opcua_server: OpcUaTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = source(
        opcua_server,
        tmp_path,
        [
            tag("TEMP_WELL_001", "downhole_temperature"),  # EU display name °F
            tag("PRESS_BAR", "wellhead_pressure"),  # EU with only the UNECE code BAR
            tag("WHP_WELL_001", "wellhead_pressure"),  # no EngineeringUnits at all
        ],
    )
    collector = OpcUaCollector(config)
    sink = MemorySink()
    t0 = base_time()
    async with running(collector, sink):
        await until(lambda: len(sink.readings) >= 2)
        await opcua_server.write("TEMP_WELL_001", 212.0, t0)
        await opcua_server.write("PRESS_BAR", 150.0, t0)
        await until(lambda: len([r for r in sink.readings if r.value is not None]) == 2)
    units = {r.tag: r.unit for r in sink.readings if r.value is not None}
    assert units == {"ns=2;i=1004": "degF", "ns=2;i=1005": "bar"}
    assert collector.counts["bad_tag"] == 1
    assert "no EngineeringUnits property; set unit" in caplog.text


@pytest.mark.parametrize(
    ("display", "code", "expected"),
    [
        ("°F", "", "degF"),
        ("°C", "", "degC"),
        ("psi", "", "psi"),
        ("kPa", "", "kPa"),
        ("m³/h", "", "m3/h"),
        ("bbl/d", "", "bbl/day"),
        ("klb", "", "klbs"),
        ("furlong", "", "furlong"),  # unknown: kept, the gateway decides
        ("", "CEL", "degC"),
        ("", "PS", "psi"),
        ("", "ZZZ", None),
        ("", "", None),
    ],
)
def test_eu_information_in_our_spelling(display: str, code: str, expected: str | None) -> None:
    assert unit_from_eu(eu(display, code)) == expected


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (StatusCodes.Good, Quality.GOOD),
        (StatusCodes.GoodClamped, Quality.GOOD),
        (StatusCodes.UncertainSensorNotAccurate, Quality.UNCERTAIN),
        (StatusCodes.UncertainLastUsableValue, Quality.UNCERTAIN),
        (StatusCodes.Bad, Quality.BAD),
        (StatusCodes.BadSensorFailure, Quality.BAD),
        (StatusCodes.BadCommunicationError, Quality.BAD),
        (0xC0000000, Quality.BAD),  # the reserved severity
    ],
)
def test_status_codes_map_to_quality_by_severity(code: int, quality: Quality) -> None:
    assert quality_of(ua.StatusCode(ua.UInt32(code))) is quality


# --- probe and security ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "server_policy"),
    [
        ("Basic256Sha256", ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt),
        ("Aes128Sha256RsaOaep", ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt),
    ],
)
async def test_probe_says_what_it_found(
    tmp_path: Path, pki: Pki, policy: str, server_policy: ua.SecurityPolicyType
) -> None:
    server = OpcUaTestServer(tmp_path / "server", pki, policies=(server_policy,))
    await server.start()
    try:
        config = source(
            server,
            tmp_path,
            [tag("WHP_WELL_001", "wellhead_pressure", "psi"), tag("TEMP_WELL_001", "t")],
            connection={"security_policy": policy},
        )
        found = await config.build().probe()
        # The certificate made on first contact is kept.
        certificate = (tmp_path / "pki" / CLIENT_CERTIFICATE_FILE).read_bytes()
        await config.build().probe()
        assert (tmp_path / "pki" / CLIENT_CERTIFICATE_FILE).read_bytes() == certificate
    finally:
        await server.stop()
    assert found == (
        f"{server.endpoint}: {policy}/SignAndEncrypt, user {USER}; server "
        f"FreeOpcUa Python Server {found.split('FreeOpcUa Python Server ')[1].split(' (')[0]} "
        "(Running); 2 tags readable"
    )


async def test_probe_with_a_trust_directory(opcua_server: OpcUaTestServer, tmp_path: Path) -> None:
    trust = tmp_path / "trusted"
    trust.mkdir()
    (trust / "server.der").write_bytes(opcua_server.pki.certificate.read_bytes())
    (trust / "other.der").write_bytes(opcua_server.pki.stranger.read_bytes())
    config = source(
        opcua_server,
        tmp_path,
        [tag("WHP_WELL_001", "wellhead_pressure", "psi")],
        connection={"server_certificate": None, "trust_dir": str(trust)},
    )
    assert "1 tags readable" in await config.build().probe()


async def test_probe_failures_say_why(opcua_server: OpcUaTestServer, tmp_path: Path) -> None:
    tags = [tag("WHP_WELL_001", "wellhead_pressure", "psi")]
    untrusted = tmp_path / "untrusted"
    untrusted.mkdir()
    (untrusted / "other.der").write_bytes(opcua_server.pki.stranger.read_bytes())
    cases: list[tuple[OpcUaConfig, str, bool]] = [
        (
            source(opcua_server, tmp_path, tags, connection={"password": "wrong"}),
            f"the server refused user '{USER}'",
            False,
        ),
        (
            source(
                opcua_server,
                tmp_path,
                tags,
                connection={"server_certificate": None, "trust_dir": str(untrusted)},
            ),
            "the server's certificate (SHA-1 thumbprint",
            False,
        ),
        (
            source(
                opcua_server,
                tmp_path,
                tags,
                connection={"server_certificate": str(opcua_server.pki.stranger)},
            ),
            f"is not the pinned {opcua_server.pki.stranger}",
            False,
        ),
        (
            source(opcua_server, tmp_path, tags, connection={"security_mode": "Sign"}),
            "offers no endpoint with Sign and Basic256Sha256 (it offers "
            "Basic256Sha256/SignAndEncrypt)",
            False,
        ),
        (
            source(
                opcua_server,
                tmp_path,
                [*tags, {"node_id": "ns=2;i=9999", "parameter": "p", "well_id": "w", "unit": "u"}],
            ),
            "1 of 2 tags cannot be read: ns=2;i=9999: BadNodeIdUnknown",
            False,
        ),
    ]
    for config, message, retryable in cases:
        with pytest.raises(CollectorError) as caught:
            await config.build().probe()
        assert message in str(caught.value)
        assert caught.value.retryable is retryable, str(caught.value)
        assert PASSWORD not in str(caught.value) and "wrong" not in str(caught.value)
    # Nobody listening: retryable.
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    gone = source(opcua_server, tmp_path, tags, connection={"endpoint": endpoint})
    with pytest.raises(CollectorError, match=f"cannot connect to {endpoint}") as caught:
        await gone.build().probe()
    assert caught.value.retryable


# --- configuration --------------------------------------------------------------------------------


def test_the_sample_config_loads(tmp_path: Path) -> None:
    config = support.load_sample(
        tmp_path, "opcua", environ={"SCADA_USERNAME": "op", "SCADA_PASSWORD": "pw"}
    )
    [scada] = config.data_sources
    assert isinstance(scada, OpcUaConfig)
    assert scada.connection.security_mode == "SignAndEncrypt"
    assert scada.connection.password is not None
    assert scada.connection.password.get_secret_value() == "pw"
    assert [scada.poll_seconds(t) for t in scada.tags] == [None, None, 5.0, 30.0]


_GOOD: dict[str, Any] = {
    "name": "scada",
    "type": "opcua",
    "connection": {"endpoint": "opc.tcp://10.0.1.50:4840", "server_certificate": "s.der"},
    "tags": [{"node_id": "ns=2;s=WHP", "parameter": "wellhead_pressure", "well_id": "W1"}],
}


def _with(**changes: Any) -> dict[str, Any]:
    entry = {**_GOOD, **changes}
    return entry


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            _with(connection={"endpoint": "opc.tcp://10.0.1.50:4840"}),
            ".connection: security_mode SignAndEncrypt needs the server's certificate",
        ),
        (
            _with(connection={"endpoint": "http://10.0.1.50:4840", "security_mode": "None"}),
            ".connection.endpoint: must be an opc.tcp:// URL",
        ),
        (
            _with(connection={"endpoint": "opc.tcp://op:pw@host:4840", "security_mode": "None"}),
            ".connection.endpoint: must not hold credentials",
        ),
        (
            _with(
                connection={
                    "endpoint": "opc.tcp://h:4840",
                    "security_mode": "None",
                    "trust_dir": "t",
                }
            ),
            ".connection: server_certificate and trust_dir apply only with security_mode Sign",
        ),
        (
            _with(connection={**_GOOD["connection"], "security_policy": "Basic128Rsa15"}),
            ".connection.security_policy: Input should be 'Basic256Sha256' or "
            "'Aes128Sha256RsaOaep'",
        ),
        (
            _with(connection={**_GOOD["connection"], "username": "op"}),
            ".connection: username and password go together",
        ),
        (
            _with(tags=[{"node_id": "WHP", "parameter": "p", "well_id": "w"}]),
            ".tags[0].node_id: 'WHP' is not an OPC UA node id",
        ),
        (
            _with(tags=[_GOOD["tags"][0], _GOOD["tags"][0]]),
            ": tags[1]: node_id 'ns=2;s=WHP' is already tags[0]",
        ),
        (
            _with(mode="poll", tags=[{**_GOOD["tags"][0], "deadband": 0.5}]),
            ": tags[0] (ns=2;s=WHP): deadband applies to subscribed tags only",
        ),
        (_with(poll_interval=5), ": poll_interval applies with mode: poll; under mode: subscribe"),
        (
            _with(keepalive_count=10, watchdog_intervals=10),
            ": watchdog_intervals (10) must be more than keepalive_count (10)",
        ),
        (_with(tags=[]), ".tags: must have at least 1 item"),
        (_with(tags=[{**_GOOD["tags"][0], "wel_id": "x"}]), ".tags[0].wel_id: unknown key"),
        (_with(publishing_interval="1ms"), ".publishing_interval: must be at least"),
    ],
)
def test_bad_configs_are_refused_with_their_path(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(support.agent_file(tmp_path, [entry]))
    assert f": data_sources[0] (scada){message}" in str(caught.value), str(caught.value)


def test_the_password_is_never_shown(tmp_path: Path) -> None:
    entry = _with(
        connection={**_GOOD["connection"], "username": "op", "password": "hunter2-secret"}
    )
    config = load_agent_config(support.agent_file(tmp_path, [entry]))
    assert "hunter2-secret" not in repr(config) and "hunter2-secret" not in config.summary()
