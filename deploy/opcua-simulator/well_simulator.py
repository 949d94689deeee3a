"""An OPC UA server with three simulated wells, for the docker-compose stack and for tests.

Run from the agent's image (which has asyncua and the ``edge`` package), as docker-compose.yml's
``opcua-simulator`` service does, or from the project's virtual environment:

    python deploy/opcua-simulator/well_simulator.py [--endpoint opc.tcp://0.0.0.0:4840/]

Namespace ``urn:welltegra:opcua-well-simulator`` holds, under Objects/Wells, one object per well
(WELL-001 to WELL-003) with four Double variables, each with an ``EngineeringUnits`` property
(EUInformation) so that the agent needs no ``unit`` in its tags:

    WHP_WELL_00n    wellhead pressure       psi
    HL_WELL_00n     hookload                klb
    FLOW_WELL_00n   flow rate               bbl/d
    TEMP_WELL_00n   downhole temperature    °F

The values are those of the agent's own ``simulator`` source (``edge.collectors.simulator``,
seed 0, one reading a second), written once a second with the reading's instant as source
timestamp: deterministic, the same on every machine. A reading the simulator marks BAD is
written with the status BadSensorFailure, and now and then a value is impossible on purpose,
as the built-in simulator makes them, for the gateway's validation to catch. Every variable is
historized (in memory, the last ``--history-hours`` hours), so the agent's collector can fill a
gap from history after a restart (HistoryRead).

Security: without ``--certificate`` the server offers security mode None only, which is what
the compose demonstration uses (the server is reachable on the compose network and the host's
loopback only). With ``--certificate`` and ``--private-key`` (DER or PEM; the certificate's
application URI should be ``urn:welltegra:opcua-well-simulator``) it offers Basic256Sha256
SignAndEncrypt as well, and the agent then pins that certificate (``server_certificate``).
Client certificates are not checked: this is a simulator, not a site's server.

Stops cleanly on SIGTERM (``docker compose stop``) and SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast
from urllib.parse import urlsplit

from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes

from edge.collectors.simulator import Simulator, SimulatorConfig
from edge.readings import Quality

__all__ = ["NAMESPACE", "SimulatedTag", "main", "node_ids", "simulated_tags"]

log = logging.getLogger("well_simulator")

NAMESPACE = "urn:welltegra:opcua-well-simulator"
WELLS = ("WELL-001", "WELL-002", "WELL-003")
DEFAULT_ENDPOINT = "opc.tcp://0.0.0.0:4840/"
DEFAULT_HISTORY_HOURS = 1.0
_UNECE_UNITS = "http://www.opcfoundation.org/UA/units/un/cefact"


@dataclass(frozen=True)
class _Parameter:
    prefix: str  # of the node's name, as a SCADA would spell it
    description: str
    display_unit: str  # EUInformation.DisplayName; the agent maps it to the registry's spelling
    unece_code: str  # UNECE Recommendation 20 common code; "" when there is none


# The simulator's parameters (edge.collectors.simulator.SIMULATED_PARAMETERS), in its order.
_PARAMETERS = {
    "wellhead_pressure": _Parameter("WHP", "Wellhead pressure", "psi", "PS"),
    "hookload": _Parameter("HL", "Hookload", "klb", ""),
    "flow_rate": _Parameter("FLOW", "Flow rate", "bbl/d", "B1"),
    "downhole_temperature": _Parameter("TEMP", "Downhole temperature", "°F", "FAH"),
}


@dataclass(frozen=True)
class SimulatedTag:
    """One variable of the server: its node id (with the namespace's URI, so it does not
    depend on the server's namespace order), the well and parameter it measures, its unit."""

    name: str
    node_id: str
    well_id: str
    parameter: str
    unit: str  # the EngineeringUnits display name


def simulated_tags() -> list[SimulatedTag]:
    """Every variable the server exposes, wells in order, each with its parameters in order
    (the order of ``Simulator.readings_at``)."""
    tags = []
    for well in WELLS:
        for parameter, spec in _PARAMETERS.items():
            name = f"{spec.prefix}_{well.replace('-', '_')}"
            tags.append(
                SimulatedTag(name, f"nsu={NAMESPACE};s={name}", well, parameter, spec.display_unit)
            )
    return tags


def node_ids() -> list[str]:
    """The node ids of every variable, as an agent's ``opcua`` tags name them."""
    return [tag.node_id for tag in simulated_tags()]


def _engineering_units(spec: _Parameter) -> ua.EUInformation:
    unit_id = int.from_bytes(spec.unece_code.encode(), "big") if spec.unece_code else -1
    return ua.EUInformation(
        NamespaceUri=_UNECE_UNITS,
        UnitId=unit_id,
        DisplayName=ua.LocalizedText(spec.display_unit),
        Description=ua.LocalizedText(spec.description),
    )


def _node_id(name: str, namespace: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(namespace))


def _data_value(value: float | None, quality: Quality, at: datetime) -> ua.DataValue:
    status = StatusCodes.Good if quality is Quality.GOOD else StatusCodes.BadSensorFailure
    # The simulator always gives a value; None would be written as no value.
    variant = (
        ua.Variant(None, ua.VariantType.Null)
        if value is None
        else ua.Variant(float(value), ua.VariantType.Double)
    )
    return ua.DataValue(
        variant,
        StatusCode=ua.StatusCode(ua.UInt32(status)),
        # asyncua's DateTime is a datetime; timezone-aware, as its in-memory history needs.
        SourceTimestamp=cast(ua.DateTime, at),
        ServerTimestamp=cast(ua.DateTime, datetime.now(UTC)),
    )


class WellSimulator:
    """The server and the loop that writes the simulator's readings into it."""

    def __init__(
        self,
        endpoint: str,
        history: timedelta,
        certificate: str | None = None,
        private_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.history = history
        self.certificate = certificate
        self.private_key = private_key
        self.simulator = Simulator(SimulatorConfig(name="opcua-well-simulator", wells=WELLS))
        self.tags = simulated_tags()
        self.server = Server()
        self.nodes: list[Node] = []

    async def start(self) -> None:
        server = self.server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("WellTegra OPC UA well simulator")
        await server.set_application_uri(NAMESPACE)
        await server.set_build_info(
            product_uri=NAMESPACE,
            manufacturer_name="WellTegra",
            product_name="WellTegra OPC UA well simulator",
            software_version="0.1.0",
            build_number="0",
            build_date=datetime(2024, 1, 1, tzinfo=UTC),
        )
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self.certificate is not None and self.private_key is not None:
            await server.load_certificate(self.certificate)
            await server.load_private_key(self.private_key)
            policies.append(ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt)
        server.set_security_policy(policies)
        # Anonymous clients only: no user names, hence no passwords sent in the clear.
        server.set_identity_tokens([ua.AnonymousIdentityToken])

        index = await server.register_namespace(NAMESPACE)
        wells = await server.nodes.objects.add_folder(_node_id("Wells", index), f"{index}:Wells")
        tick = self.simulator.tick_of(datetime.now(UTC))
        readings = self.simulator.readings_at(tick)
        well_objects: dict[str, Node] = {}
        for tag, reading in zip(self.tags, readings, strict=True):
            assert (tag.well_id, tag.parameter) == (reading.well_id, reading.parameter)
            if tag.well_id not in well_objects:
                well_objects[tag.well_id] = await wells.add_object(
                    _node_id(tag.well_id, index), f"{index}:{tag.well_id}"
                )
            node = await well_objects[tag.well_id].add_variable(
                _node_id(tag.name, index),
                f"{index}:{tag.name}",
                ua.Variant(0.0, ua.VariantType.Double),
            )
            await node.add_property(
                _node_id(f"{tag.name}.EngineeringUnits", index),
                ua.QualifiedName("EngineeringUnits", 0),
                _engineering_units(_PARAMETERS[tag.parameter]),
            )
            await node.write_value(_data_value(reading.value, reading.quality, reading.timestamp))
            self.nodes.append(node)
        await server.start()
        # After start(): the history manager stores each value change from here on.
        await server.historize_node_data_change(self.nodes, period=self.history)
        self._last_tick = tick
        log.info(
            "serving %d variables of %d wells on %s (security: %s)",
            len(self.nodes), len(WELLS), self.endpoint,
            ", ".join(p.name for p in policies),
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Write each second's readings, until ``stop`` is set."""
        simulator = self.simulator
        while not stop.is_set():
            due = simulator.tick_time(self._last_tick + 1) - datetime.now(UTC)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(due.total_seconds(), 0.01))
                return
            now_tick = simulator.tick_of(datetime.now(UTC))
            # Ticks missed by a busy or suspended host are written too (at most a minute's),
            # so that the history has no holes a real historian would not have.
            for tick in range(max(self._last_tick + 1, now_tick - 59), now_tick + 1):
                for node, reading in zip(self.nodes, simulator.readings_at(tick), strict=True):
                    await self.server.write_attribute_value(
                        node.nodeid, _data_value(reading.value, reading.quality, reading.timestamp)
                    )
            self._last_tick = max(self._last_tick, now_tick)

    async def stop(self) -> None:
        await self.server.stop()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"the opc.tcp:// URL to listen on (default {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--history-hours",
        type=float,
        default=DEFAULT_HISTORY_HOURS,
        help="how much history each variable keeps, in memory (default %(default)s)",
    )
    parser.add_argument(
        "--certificate", help="the server's certificate: also offer Basic256Sha256 SignAndEncrypt"
    )
    parser.add_argument("--private-key", help="the certificate's private key (with --certificate)")
    args = parser.parse_args(argv)
    if urlsplit(args.endpoint).scheme != "opc.tcp":
        parser.error("--endpoint must be an opc.tcp:// URL")
    if (args.certificate is None) != (args.private_key is None):
        parser.error("--certificate and --private-key go together")
    if args.history_hours <= 0:
        parser.error("--history-hours must be positive")
    return args


async def _serve(args: argparse.Namespace) -> None:
    simulator = WellSimulator(
        args.endpoint, timedelta(hours=args.history_hours), args.certificate, args.private_key
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await simulator.start()
    try:
        await simulator.run(stop)
    finally:
        await simulator.stop()
        log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    # asyncua logs each request at INFO.
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
