"""The ``modbus`` collector against a real pymodbus TCP server in this process, with known
register contents: decoding of every data type and order, scale and offset, poll intervals,
device exceptions that stop only their own registers, a server restart, and ``probe``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge.collectors.base import CollectorError
from edge.collectors.modbus import Modbus, ModbusConfig, decode, plan_blocks
from edge.readings import Quality, Reading
from tests.collector_support import MemorySink, free_port, load_sample, running, sample_text

ROOT = Path(__file__).parents[2]
PAGE = ROOT / "docs" / "collectors" / "modbus.md"

def _runs(registers: Mapping[int, int]) -> list[SimData]:
    """Contiguous runs of ``registers`` as SimData blocks; addresses between stay invalid."""
    blocks: list[SimData] = []
    run: list[int] = []
    start = -2
    for address in sorted(registers):
        if run and address != start + len(run):
            blocks.append(SimData(address=start, values=run, datatype=DataType.REGISTERS))
            run = []
        if not run:
            start = address
        run.append(registers[address])
    if run:
        blocks.append(SimData(address=start, values=run, datatype=DataType.REGISTERS))
    return blocks


class ModbusDevice:
    """A pymodbus TCP server on a loopback port, with known holding and input registers.

    It counts every read it answers and every read it refuses, by (function code, address,
    count); ``counters`` are holding addresses incremented by each read that covers them;
    ``refuse`` makes it answer every read with DEVICE_BUSY. Restartable on the same port."""

    def __init__(
        self,
        holding: Mapping[int, int],
        inputs: Mapping[int, int] | None = None,
        *,
        unit_id: int = 1,
        counters: Sequence[int] = (),
    ) -> None:
        self.holding = dict(holding)
        self.inputs = dict(inputs or {0: 0})
        self.unit_id = unit_id
        self.counters = set(counters)
        self.port = free_port()
        self.answered: Counter[tuple[int, int, int]] = Counter()
        self.refused: Counter[tuple[int, int, int]] = Counter()
        self.refuse = False
        self._server: ModbusTcpServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: Any,
    ) -> ExcCodes | None:
        key = (function_code, address, count)
        if self.refuse:
            self.refused[key] += 1
            return ExcCodes.DEVICE_BUSY
        self.answered[key] += 1
        if function_code == 3:
            for counter in self.counters & set(range(address, address + count)):
                value = (registers[counter - start_address] + 1) % 65536
                # Kept, so a restarted device counts on from where it stopped.
                registers[counter - start_address] = self.holding[counter] = value
        return None

    async def start(self) -> None:
        bits = [SimData(address=0, values=False, datatype=DataType.BITS)]
        device = SimDevice(
            id=self.unit_id,
            simdata=(bits, list(bits), _runs(self.holding), _runs(self.inputs)),
            action=self._action,
        )
        self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
        self._task = asyncio.create_task(self._server.serve_forever())
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None


class RecordingSink(MemorySink):
    """A ``ReadingSink`` that keeps what it is given, in memory."""

    def of(self, parameter: str, well: str = "W-1") -> list[Reading]:
        return [r for r in self.readings if (r.well_id, r.parameter) == (well, parameter)]


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def words(fmt: str, value: float) -> list[int]:
    """``value`` packed big-endian as ``fmt``, as 16-bit registers (the protocol's order)."""
    raw = struct.pack(fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def encoded(fmt: str, value: float, word_order: str, byte_order: str) -> list[int]:
    """How a device with the given orders lays ``value`` out, built independently of
    ``decode``: swap the bytes in each word, then the words."""
    regs = words(fmt, value)
    if byte_order == "little":
        regs = [((w & 0xFF) << 8) | (w >> 8) for w in regs]
    if word_order == "little":
        regs = regs[::-1]
    return regs


FORMATS = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
# (data type, word order, byte order, value): every type, every order where it matters.
CASES = [
    ("int16", "big", "big", -1234),
    ("int16", "big", "little", -1234),
    ("uint16", "big", "big", 65000),
    ("uint16", "big", "little", 513),
    ("int32", "big", "big", -123_456_789),
    ("int32", "little", "big", -123_456_789),
    ("int32", "big", "little", 2_000_000_001),
    ("int32", "little", "little", -7),
    ("uint32", "big", "big", 3_000_000_000),
    ("uint32", "little", "big", 3_000_000_000),
    ("uint32", "little", "little", 65_537),
    ("float32", "big", "big", 1234.5),
    ("float32", "little", "big", -0.15625),
    ("float32", "big", "little", 2851.25),
    ("float32", "little", "little", 98765.5),
]


def test_decode_every_type_and_order() -> None:
    for data_type, word_order, byte_order, value in CASES:
        registers = encoded(FORMATS[data_type], value, word_order, byte_order)
        got = decode(registers, data_type, word_order, byte_order)  # type: ignore[arg-type]
        assert got == pytest.approx(value), (data_type, word_order, byte_order)
    # The orders matter: the same registers read big/big give another number.
    assert decode([0x0001, 0x0000], "uint32", "little", "big") == 1
    assert decode([0x0001, 0x0000], "uint32", "big", "big") == 65536
    assert decode([0x0100], "uint16", "big", "little") == 1


def layout() -> tuple[dict[int, int], list[dict[str, Any]], dict[str, float]]:
    """Holding registers holding every case at its own address, the register configs that
    read them, and the value each (parameter name) must give."""
    holding: dict[int, int] = {}
    registers: list[dict[str, Any]] = []
    expected: dict[str, float] = {}
    address = 0
    for index, (data_type, word_order, byte_order, value) in enumerate(CASES):
        regs = encoded(FORMATS[data_type], value, word_order, byte_order)
        holding.update({address + i: r for i, r in enumerate(regs)})
        name = f"case_{index}"
        registers.append(
            {
                "address": address, "data_type": data_type, "word_order": word_order,
                "byte_order": byte_order, "parameter": name, "unit": "psi",
            }
        )
        expected[name] = value
        address += len(regs)
    return holding, registers, expected


def config(port: int, registers: list[dict[str, Any]], **keys: Any) -> ModbusConfig:
    return ModbusConfig.model_validate(
        {
            "name": "plc", "type": "modbus", "host": "127.0.0.1", "port": port,
            "well_id": "W-1", "poll_interval": "100ms", "timeout": "1s",
            "registers": registers, **keys,
        }
    )


async def test_every_data_type_and_order_from_a_real_device() -> None:
    holding, registers, expected = layout()
    device = ModbusDevice(holding, inputs={7: 777})
    await device.start()
    try:
        registers.append(
            {"address": 7, "table": "input", "data_type": "uint16", "parameter": "from_input",
             "unit": "psi"}
        )
        expected["from_input"] = 777
        source = config(device.port, registers)
        collector = Modbus(source)
        # All the holding cases touch: one request reads them all; the input is another.
        [group] = collector.groups
        assert [(b.table, b.address, b.count) for b in group.blocks] == [
            ("holding", 0, len(holding)), ("input", 7, 1)
        ]
        sink = RecordingSink()
        async with running(collector, sink):
            await wait_until(lambda: all(sink.of(name) for name in expected))
    finally:
        await device.stop()
    for name, value in expected.items():
        reading = sink.of(name)[0]
        assert reading.value == pytest.approx(value), name
        assert (reading.quality, reading.unit) == (Quality.GOOD, "psi")
        assert reading.timestamp.tzinfo is not None
    assert sink.of("from_input")[0].tag == "unit1/input/7"
    assert device.answered[(3, 0, len(holding))] >= 1


async def test_scale_offset_and_defaults() -> None:
    device = ModbusDevice({0: 1500, 1: 0xFFFF, 2: 25})
    await device.start()
    try:
        source = config(
            device.port,
            [
                {"address": 0, "data_type": "uint16", "scale": 0.1, "offset": -10,
                 "parameter": "wellhead_pressure", "unit": "bar"},
                {"address": 1, "data_type": "int16", "scale": 2, "parameter": "hookload",
                 "unit": "klbs", "well_id": "W-2", "tag": "HL-2"},
                {"address": 2, "data_type": "uint16", "offset": 0.5,
                 "parameter": "flow_rate", "unit": "bbl/day"},
            ],
        )
        sink = RecordingSink()
        async with running(Modbus(source), sink):
            await wait_until(lambda: len(sink.of("flow_rate")) >= 1)
    finally:
        await device.stop()
    assert sink.of("wellhead_pressure")[0].value == pytest.approx(140.0)
    hookload = sink.of("hookload", well="W-2")[0]
    assert (hookload.value, hookload.tag) == (-2.0, "HL-2")
    assert sink.of("flow_rate")[0].value == 25.5
    assert "last_poll" in sink.watermarks


async def test_poll_intervals_are_kept_per_register() -> None:
    device = ModbusDevice({0: 1, 1: 2, 10: 3})
    await device.start()
    try:
        source = config(
            device.port,
            [
                {"address": 0, "data_type": "uint16", "parameter": "fast", "unit": "psi",
                 "poll_interval": "200ms"},
                {"address": 1, "data_type": "uint16", "parameter": "fast_too", "unit": "psi",
                 "poll_interval": "200ms"},
                {"address": 10, "data_type": "uint16", "parameter": "slow", "unit": "psi",
                 "poll_interval": "600ms"},
            ],
        )
        collector = Modbus(source)
        assert [(g.interval, len(g.blocks)) for g in collector.groups] == [(0.2, 1), (0.6, 1)]
        sink = RecordingSink()
        async with running(collector, sink):
            await wait_until(lambda: len(sink.of("slow")) >= 5, timeout=20)
            device.refuse = True  # from here no read gives a value
            await wait_until(lambda: sum(device.refused.values()) >= 2)
    finally:
        await device.stop()
    fast = [r for r in sink.of("fast") if r.value is not None]
    slow = [r for r in sink.of("slow") if r.value is not None]
    # Every answered read became readings, no more: one request for the two fast registers.
    assert len(fast) == len([r for r in sink.of("fast_too") if r.value is not None])
    assert len(fast) == device.answered[(3, 0, 2)]
    assert len(slow) == device.answered[(3, 10, 1)]
    # Each read falls in its own slot of its interval's grid, and the fast register is read
    # about three times as often as the slow one.
    for readings, interval in ((fast, 0.2), (slow, 0.6)):
        slots = [math.floor(r.timestamp.timestamp() / interval) for r in readings]
        assert len(set(slots)) == len(slots), f"two reads in one {interval}s slot"
        assert slots == sorted(slots)
    assert 2.0 <= len(fast) / len(slow) <= 4.0


async def test_a_device_exception_stops_only_its_own_registers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 31 and 50 are not on the device: it answers ILLEGAL ADDRESS for any read covering them.
    device = ModbusDevice({30: 300, 32: 320, 40: 400})
    await device.start()
    try:
        source = config(
            device.port,
            [
                {"address": 30, "data_type": "uint16", "parameter": "p30", "unit": "psi"},
                {"address": 31, "data_type": "uint16", "parameter": "p31", "unit": "psi"},
                {"address": 32, "data_type": "uint16", "parameter": "p32", "unit": "psi"},
                {"address": 40, "data_type": "uint16", "parameter": "p40", "unit": "psi"},
                {"address": 50, "data_type": "uint16", "parameter": "p50", "unit": "psi"},
            ],
        )
        collector = Modbus(source)
        assert [(b.address, b.count) for b in collector.groups[0].blocks] == [
            (30, 3), (40, 1), (50, 1)
        ]
        sink = RecordingSink()
        with caplog.at_level(logging.INFO, logger="edge.collectors.modbus"):
            async with running(collector, sink):
                await wait_until(lambda: len(sink.of("p32")) >= 5)
    finally:
        await device.stop()
    for good, value in (("p30", 300), ("p32", 320), ("p40", 400)):
        assert {r.value for r in sink.of(good)} == {value}
    for bad in ("p31", "p50"):
        readings = sink.of(bad)
        assert readings and all(r.value is None and r.quality is Quality.BAD for r in readings)
    # The refused block was split into single registers once, and the rest read on.
    assert [(b.address, b.count) for b in collector.groups[0].blocks] == [
        (30, 1), (31, 1), (32, 1), (40, 1), (50, 1)
    ]
    assert collector.stats.failed_reads["illegal data address"] >= 5
    failures = [r for r in caplog.records if "read failed" in r.getMessage()]
    # Logged once per failing block (31 and 50), not once per poll.
    assert sorted(r.getMessage().split(": ")[1] for r in failures) == [
        "holding 31 of unit 1", "holding 50 of unit 1"
    ]


async def test_failed_reads_are_logged_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    device = ModbusDevice({0: 5})
    await device.start()
    try:
        sink = RecordingSink()
        collector = Modbus(
            config(device.port, [{"address": 0, "data_type": "uint16", "parameter": "p",
                                  "unit": "psi"}])
        )
        with caplog.at_level(logging.INFO, logger="edge.collectors.modbus"):
            async with running(collector, sink):
                await wait_until(lambda: len(sink.of("p")) >= 2)
                device.refuse = True
                await wait_until(lambda: sum(device.refused.values()) >= 4)
                device.refuse = False
                count = len(sink.of("p"))
                await wait_until(lambda: len(sink.of("p")) >= count + 2)
    finally:
        await device.stop()
    values = [r.value for r in sink.of("p")]
    assert None in values and values[0] == 5 and values[-1] == 5
    messages = [r.getMessage() for r in caplog.records]
    assert sum("read failed: device busy" in m for m in messages) == 1
    assert sum("reads again after" in m for m in messages) == 1
    assert collector.stats.failed_reads["device busy"] == values.count(None)


async def test_collection_resumes_after_a_server_restart(caplog: pytest.LogCaptureFixture) -> None:
    device = ModbusDevice({0: 1}, counters=[0])
    await device.start()
    source = config(
        device.port, [{"address": 0, "data_type": "uint16", "parameter": "p", "unit": "psi"}]
    )
    sink = RecordingSink()
    try:
        task = asyncio.create_task(Modbus(source).run(sink))
        await wait_until(lambda: len(sink.of("p")) >= 3)
        await device.stop()
        # A lost connection ends run() with a retryable error (the agent restarts it).
        with pytest.raises(CollectorError) as error:
            await asyncio.wait_for(task, timeout=10)
        assert error.value.retryable
        # While the device is down a new run cannot connect, and says so.
        with pytest.raises(CollectorError, match="cannot connect"):
            await asyncio.wait_for(Modbus(source).run(sink), timeout=10)
        before = len(sink.of("p"))
        await device.start()
        with caplog.at_level(logging.WARNING, logger="edge.collectors.modbus"):
            async with running(Modbus(source), sink):
                await wait_until(lambda: len(sink.of("p")) >= before + 3)
    finally:
        await device.stop()
    assert "Modbus keeps no history" in caplog.text
    # The counter register went on counting: every read after the restart is newer.
    values = [r.value or 0.0 for r in sink.of("p")]
    assert 0.0 not in values
    assert values == sorted(values) and len(set(values)) == len(values)


async def test_probe() -> None:
    device = ModbusDevice({0: 1, 1: 2})
    await device.start()
    try:
        registers = [
            {"address": 0, "data_type": "uint16", "parameter": "a", "unit": "psi"},
            {"address": 9, "data_type": "uint16", "parameter": "b", "unit": "psi",
             "poll_interval": "2s"},
        ]
        text = await Modbus(config(device.port, registers)).probe()
        assert text.startswith(f"127.0.0.1:{device.port}: 2 registers in 1/2 reads")
        assert "holding 9 of unit 1: illegal data address" in text
        with pytest.raises(CollectorError, match="no read succeeded"):
            await Modbus(config(device.port, registers[1:])).probe()
    finally:
        await device.stop()
    with pytest.raises(CollectorError, match=f"cannot connect to 127.0.0.1:{device.port}"):
        await Modbus(config(device.port, registers)).probe()


def test_blocks_group_by_interval_unit_table_and_touching_addresses() -> None:
    source = config(
        1,
        [
            {"address": 0, "data_type": "float32", "parameter": "a", "unit": "psi"},
            {"address": 2, "data_type": "uint16", "parameter": "b", "unit": "psi"},
            {"address": 4, "data_type": "uint16", "parameter": "c", "unit": "psi"},
            {"address": 3, "data_type": "uint16", "parameter": "d", "unit": "psi",
             "table": "input"},
            {"address": 5, "data_type": "uint16", "parameter": "e", "unit": "psi",
             "unit_id": 7},
            {"address": 100, "data_type": "int32", "parameter": "f", "unit": "psi"},
            {"address": 102, "data_type": "int32", "parameter": "g", "unit": "psi"},
            {"address": 104, "data_type": "int32", "parameter": "h", "unit": "psi",
             "poll_interval": "5s"},
        ],
        max_registers_per_read=3,
    )
    groups = plan_blocks(source)
    assert [
        [(b.unit_id, b.table, b.address, b.count) for b in g.blocks] for g in groups
    ] == [
        [(1, "holding", 0, 3), (1, "holding", 4, 1), (1, "holding", 100, 2),
         (1, "holding", 102, 2), (1, "input", 3, 1), (7, "holding", 5, 1)],
        [(1, "holding", 104, 2)],
    ]


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"registers": []}, "at least 1"),
        ({"well_id": None}, "registers[0].well_id: is required"),
        ({"registers": [{"address": 0, "data_type": "int64", "parameter": "p", "unit": "u"}]},
         "data_type"),
        ({"registers": [{"address": 65535, "data_type": "int32", "parameter": "p",
                         "unit": "u"}]}, "runs past 65535"),
        ({"registers": [{"address": 0, "data_type": "int16", "parameter": "p", "unit": "u"},
                        {"address": 1, "data_type": "int16", "parameter": "p", "unit": "u"}]},
         "registers[1]: W-1 p is already read by registers[0]"),
        ({"poll_interval": "1ms"}, "at least 10ms"),
        ({"timeout": "0s"}, "more than 0s"),
        ({"max_registers_per_read": 126}, "125"),
        ({"registers": [{"address": 0, "data_type": "int16", "parameter": "p", "unit": "u",
                         "wordorder": "big"}]}, "wordorder"),
    ],
)
def test_bad_configs_fail_at_load(keys: dict[str, Any], problem: str) -> None:
    base: dict[str, Any] = {
        "name": "plc", "type": "modbus", "host": "127.0.0.1", "well_id": "W-1",
        "registers": [{"address": 0, "data_type": "int16", "parameter": "p", "unit": "u"}],
    }
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        ModbusConfig.model_validate({**base, **keys})


def test_the_sample_loads(tmp_path: Path) -> None:
    loaded = load_sample(tmp_path, "modbus", environ={})
    [source] = loaded.data_sources
    assert isinstance(source, ModbusConfig)
    assert len(source.registers) >= 3
    assert Modbus(source).groups



def test_the_page_shows_the_sample() -> None:
    page = PAGE.read_text(encoding="utf-8")
    shown = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == sample_text("modbus")
