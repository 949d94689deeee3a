"""The ``modbus`` collector: holding and input registers of a Modbus TCP device, polled.

Each configured register names its address, table (holding or input), data type, word and byte
order, scale and offset, and the well, parameter and unit it stands for. Registers of the same
device (unit id), table and poll interval whose addresses touch are read with one request (a
block, at most ``max_registers_per_read`` registers). Polls are aligned to their interval (a
``1s`` register is read just after each whole second of the agent's clock).

Modbus carries no timestamps: a reading is stamped with the agent's clock when its request is
sent. Modbus keeps no history either, so nothing read while the agent was down can be fetched
later; the ``last_poll`` watermark only lets a restart say how long the gap was.

Failures:

* the device answers a request with an exception (illegal data address, device busy, ...) or
  does not answer in ``timeout``: that block has no value this poll. Its registers are emitted
  as readings without a value (the agent counts them under ``no_value``), logged once until the
  block reads again, and the other blocks go on. A block the device refuses as an illegal
  address is split into single registers, so one bad address costs only its own register.
* the connection cannot be made or is lost: ``CollectorError`` (retryable); the agent restarts
  the collector with backoff.

Errors: ``CollectorError`` (edge.collectors.base) only; pymodbus's exceptions are translated here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edge.collectors.base import CollectorError, ReadingSink
from edge.collectors.modbus_config import (
    LAYOUT,
    ModbusConfig,
    ModbusRegister,
    Order,
    Table,
)
from edge.readings import Quality, Reading

__all__ = ["Modbus", "ModbusConfig", "ModbusRegister"]

log = logging.getLogger(__name__)

WATERMARK_KEY = "last_poll"
# Modbus exception codes, for the log.
_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_ILLEGAL_DATA_ADDRESS = 2


@dataclass(frozen=True, slots=True)
class _Value:
    """A configured register, resolved against the source's defaults."""

    offset_in_block: int
    size: int
    fmt: str
    word_order: Order
    byte_order: Order
    scale: float
    offset: float
    well_id: str
    parameter: str
    unit: str
    tag: str


@dataclass(slots=True)
class _Block:
    """One read request: ``count`` registers from ``address`` of one table of one device."""

    unit_id: int
    table: Table
    address: int
    count: int
    values: list[_Value]
    failing: bool = False  # an episode of failed reads is going on (logged once)
    failures: int = 0  # in the current episode

    def describe(self) -> str:
        last = self.address + self.count - 1
        span = f"{self.address}" if last == self.address else f"{self.address}-{last}"
        return f"{self.table} {span} of unit {self.unit_id}"


@dataclass(slots=True)
class _Group:
    """The blocks polled together, every ``interval`` seconds."""

    interval: float
    blocks: list[_Block]
    next_due: float = 0.0  # wall-clock seconds
    skipped: int = 0  # polls missed because the previous one ran late


@dataclass(slots=True)
class ModbusStats:
    """What the collector has done since it started (for logs and tests)."""

    polls: int = 0
    reads: int = 0
    failed_reads: Counter[str] = field(default_factory=Counter)  # reason → count
    skipped_polls: int = 0


def decode(registers: Sequence[int], data_type: str, word_order: Order, byte_order: Order) -> float:
    """The value of ``registers`` (16-bit each, as read) under the given encoding.

    ``word_order`` big: the first register holds the most significant word; ``byte_order``
    big: each register's high byte comes first (the protocol's own order)."""
    size, fmt = LAYOUT[data_type]
    if len(registers) != size:
        raise ValueError(f"{data_type} takes {size} registers, not {len(registers)}")
    words = list(registers) if word_order == "big" else list(reversed(registers))
    raw = b"".join(
        word.to_bytes(2, "big") if byte_order == "big" else word.to_bytes(2, "little")
        for word in words
    )
    return float(struct.unpack(fmt, raw)[0])


def plan_blocks(config: ModbusConfig) -> list[_Group]:
    """Group the registers by poll interval, then by (unit, table), then into blocks of
    touching addresses of at most ``max_registers_per_read`` registers."""
    by_key: dict[tuple[float, int, Table], list[ModbusRegister]] = {}
    for register in config.registers:
        interval = (register.poll_interval or config.poll_interval).total_seconds()
        unit_id = config.unit_id if register.unit_id is None else register.unit_id
        by_key.setdefault((interval, unit_id, register.table), []).append(register)
    groups: dict[float, _Group] = {}
    for (interval, unit_id, table), registers in sorted(by_key.items()):
        group = groups.setdefault(interval, _Group(interval=interval, blocks=[]))
        block: _Block | None = None
        for register in sorted(registers, key=lambda r: r.address):
            end = register.address + register.size
            if (
                block is None
                or register.address > block.address + block.count
                or end - block.address > config.max_registers_per_read
            ):
                block = _Block(unit_id, table, register.address, 0, [])
                group.blocks.append(block)
            block.count = max(block.count, end - block.address)
            block.values.append(_resolve(config, register, register.address - block.address))
    return [groups[interval] for interval in sorted(groups)]


def _resolve(config: ModbusConfig, register: ModbusRegister, offset_in_block: int) -> _Value:
    unit_id = config.unit_id if register.unit_id is None else register.unit_id
    well = register.well_id or config.well_id
    assert well is not None  # checked by ModbusConfig
    return _Value(
        offset_in_block=offset_in_block,
        size=register.size,
        fmt=register.data_type,
        word_order=register.word_order or config.word_order,
        byte_order=register.byte_order or config.byte_order,
        scale=register.scale,
        offset=register.offset,
        well_id=well,
        parameter=register.parameter,
        unit=register.unit,
        tag=register.tag or f"unit{unit_id}/{register.table}/{register.address}",
    )


def _split(block: _Block) -> list[_Block]:
    """``block`` as one block per configured value."""
    return [
        _Block(
            block.unit_id,
            block.table,
            block.address + value.offset_in_block,
            value.size,
            [replace(value, offset_in_block=0)],
        )
        for value in block.values
    ]


class Modbus:
    """The running collector: implements ``Collector``; see the module docstring."""

    def __init__(self, config: ModbusConfig) -> None:
        self.config = config
        self.groups = plan_blocks(config)
        self.stats = ModbusStats()

    def _client(self) -> AsyncModbusTcpClient:
        config = self.config
        return AsyncModbusTcpClient(
            config.host,
            port=config.port,
            timeout=config.timeout.total_seconds(),
            retries=0,  # a missed poll is counted; the next poll is the retry
            reconnect_delay=0,  # a lost connection ends run(); the agent restarts it
            name=f"modbus-{config.name}",
        )

    async def _connect(self) -> AsyncModbusTcpClient:
        config = self.config
        client = self._client()
        try:
            connected = await asyncio.wait_for(
                client.connect(), timeout=config.timeout.total_seconds() + 1
            )
        except (ModbusException, OSError, TimeoutError) as exc:
            client.close()
            raise CollectorError(f"cannot connect to {config.host}:{config.port}: {exc}") from exc
        if not connected:
            client.close()
            raise CollectorError(f"cannot connect to {config.host}:{config.port}")
        return client

    async def probe(self) -> str:
        """Connect, read every block once, and say how many answered."""
        client = await self._connect()
        try:
            blocks = [block for group in self.groups for block in group.blocks]
            failed: list[str] = []
            for block in blocks:
                _, error, _ = await self._read(client, block)
                if error is not None:
                    failed.append(f"{block.describe()}: {error}")
        finally:
            client.close()
        config = self.config
        where = f"{config.host}:{config.port}"
        if len(failed) == len(blocks):
            raise CollectorError(f"{where}: connected, but no read succeeded: {failed[0]}")
        registers = sum(len(block.values) for block in blocks)
        text = f"{where}: {registers} registers in {len(blocks) - len(failed)}/{len(blocks)} reads"
        return text + (f"; failed: {'; '.join(failed)}" if failed else "")

    async def run(self, sink: ReadingSink) -> None:
        """Poll every group on its interval until cancelled."""
        config = self.config
        await self._report_gap(sink)
        client = await self._connect()
        log.info(
            "modbus %s: connected to %s:%d; %d registers in %d reads per round",
            config.name, config.host, config.port, len(config.registers),
            sum(len(group.blocks) for group in self.groups),
        )
        try:
            now = time.time()
            for group in self.groups:
                group.next_due = _next_tick(now, group.interval)
            while True:
                now = time.time()
                due = [group for group in self.groups if group.next_due <= now]
                if not due:
                    wait = min(group.next_due for group in self.groups) - now
                    await asyncio.sleep(wait)
                    continue
                readings: list[Reading] = []
                for group in due:
                    readings += await self._poll(client, group)
                polled = datetime.now(UTC)
                await sink.emit(readings, {WATERMARK_KEY: polled.isoformat()})
                after = time.time()
                for group in due:
                    following = _next_tick(after, group.interval)
                    # Ticks that passed while this poll ran are not made up: counted and said.
                    missed = round((following - group.next_due) / group.interval) - 1
                    if missed > 0:
                        if group.skipped == 0:
                            log.warning(
                                "modbus %s: the %gs poll ran late and skipped %d tick(s); "
                                "the device or the link is slower than the interval",
                                config.name, group.interval, missed,
                            )
                        group.skipped += missed
                        self.stats.skipped_polls += missed
                    group.next_due = following
        finally:
            client.close()

    async def _report_gap(self, sink: ReadingSink) -> None:
        last = await sink.watermark(WATERMARK_KEY)
        if last is not None:
            log.warning(
                "modbus %s: last poll before this start was at %s; Modbus keeps no history, "
                "so the values of the time between cannot be read",
                self.config.name, last,
            )

    async def _poll(self, client: AsyncModbusTcpClient, group: _Group) -> list[Reading]:
        self.stats.polls += 1
        readings: list[Reading] = []
        blocks = list(group.blocks)
        for block in blocks:
            timestamp = datetime.now(UTC)
            registers, error, code = await self._read(client, block)
            if code == _ILLEGAL_DATA_ADDRESS and len(block.values) > 1:
                # One bad address must not cost its neighbours: read them one by one.
                log.warning(
                    "modbus %s: %s: illegal data address; reading its %d values one by one "
                    "from now on",
                    self.config.name, block.describe(), len(block.values),
                )
                parts = _split(block)
                index = group.blocks.index(block)
                group.blocks[index : index + 1] = parts
                for part in parts:
                    timestamp = datetime.now(UTC)
                    registers, error, _ = await self._read(client, part)
                    readings += self._readings(part, timestamp, registers, error)
                continue
            readings += self._readings(block, timestamp, registers, error)
        return readings

    async def _read(
        self, client: AsyncModbusTcpClient, block: _Block
    ) -> tuple[list[int] | None, str | None, int | None]:
        """The block's registers, or None, why not and the device's exception code if it gave
        one. A lost connection raises ``CollectorError``."""
        read = (
            client.read_holding_registers if block.table == "holding"
            else client.read_input_registers
        )
        self.stats.reads += 1
        try:
            response = await read(block.address, count=block.count, device_id=block.unit_id)
        except ConnectionException as exc:
            raise CollectorError(f"{self._where()}: connection lost: {exc}") from exc
        except ModbusIOException as exc:
            if not client.connected:
                raise CollectorError(f"{self._where()}: connection lost: {exc}") from exc
            return None, "no answer", None
        except ModbusException as exc:
            return None, f"{type(exc).__name__}: {exc}", None
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            return None, _EXCEPTION_NAMES.get(code, f"exception code {code}"), code
        registers = list(response.registers)
        if len(registers) < block.count:
            return None, f"answered {len(registers)} of {block.count} registers", None
        return registers, None, None

    def _readings(
        self,
        block: _Block,
        timestamp: datetime,
        registers: list[int] | None,
        error: str | None,
    ) -> list[Reading]:
        name = self.config.name
        if registers is None:
            reason = error or "failed"
            self.stats.failed_reads[reason] += 1
            block.failures += 1
            if not block.failing:
                block.failing = True
                log.warning(
                    "modbus %s: %s: read failed: %s; its registers have no value until it "
                    "reads again (the other registers go on)",
                    name, block.describe(), reason,
                )
            # Readings without a value: the agent counts them (no_value) and sends nothing.
            return [
                Reading(v.well_id, v.parameter, timestamp, None, v.unit, Quality.BAD, v.tag)
                for v in block.values
            ]
        if block.failing:
            log.info("modbus %s: %s reads again after %d failed reads",
                     name, block.describe(), block.failures)
            block.failing = False
            block.failures = 0
        readings = []
        for v in block.values:
            raw = decode(
                registers[v.offset_in_block : v.offset_in_block + v.size],
                v.fmt, v.word_order, v.byte_order,
            )
            value = raw * v.scale + v.offset if math.isfinite(raw) else raw
            readings.append(
                Reading(v.well_id, v.parameter, timestamp, value, v.unit, Quality.GOOD, v.tag)
            )
        return readings

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"


def _next_tick(now: float, interval: float) -> float:
    """The first multiple of ``interval`` (wall-clock seconds) after ``now``."""
    return (math.floor(now / interval) + 1) * interval
