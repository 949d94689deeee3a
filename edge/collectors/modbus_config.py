"""The configuration of the ``modbus`` source (``ModbusConfig``); the collector is in
``edge.collectors.modbus``, imported by ``build()``.

Kept apart so that loading an agent's configuration does not load pymodbus unless a ``modbus``
source is configured.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.collectors.base import Collector, SourceConfig
from ingest_service.config import Duration

__all__ = [
    "LAYOUT",
    "MAX_READ_REGISTERS",
    "DataType",
    "ModbusConfig",
    "ModbusRegister",
    "Order",
    "Table",
]

DataType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]
Table = Literal["holding", "input"]

# Registers per data type, and the struct format of the big-endian bytes they make.
LAYOUT: dict[str, tuple[int, str]] = {
    "int16": (1, ">h"),
    "uint16": (1, ">H"),
    "int32": (2, ">i"),
    "uint32": (2, ">I"),
    "float32": (2, ">f"),
}
# The protocol's limit of registers in one read request.
MAX_READ_REGISTERS = 125


class ModbusRegister(BaseModel):
    """One value of the device: where it is, how it is encoded, and which point it becomes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    address: int = Field(ge=0, le=65535, description="Zero-based address of the first register.")
    table: Table = "holding"
    data_type: DataType
    word_order: Order | None = None  # None: the source's
    byte_order: Order | None = None
    scale: float = 1.0
    offset: float = 0.0
    well_id: str | None = Field(default=None, min_length=1)
    parameter: str = Field(min_length=1)
    unit: str = Field(min_length=1)
    poll_interval: Duration | None = None
    unit_id: int | None = Field(default=None, ge=0, le=255)
    tag: str | None = Field(default=None, min_length=1)

    @property
    def size(self) -> int:
        """How many 16-bit registers the value spans."""
        return LAYOUT[self.data_type][0]

    @model_validator(mode="after")
    def _fits(self) -> ModbusRegister:
        if self.address + self.size - 1 > 65535:
            raise ValueError(f"a {self.data_type} at address {self.address} runs past 65535")
        return self


class ModbusConfig(SourceConfig):
    """A Modbus TCP device (or gateway) and the registers to poll on it."""

    type: Literal["modbus"] = "modbus"
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=255, description="Default unit (slave) id.")
    timeout: Duration = timedelta(seconds=3)
    poll_interval: Duration = timedelta(seconds=1)
    well_id: str | None = Field(default=None, min_length=1)
    word_order: Order = "big"
    byte_order: Order = "big"
    max_registers_per_read: int = Field(default=MAX_READ_REGISTERS, ge=1, le=MAX_READ_REGISTERS)
    registers: tuple[ModbusRegister, ...] = Field(min_length=1)

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be more than 0s")
        return value

    @field_validator("poll_interval")
    @classmethod
    def _sane_interval(cls, value: timedelta) -> timedelta:
        return _check_interval(value)

    @model_validator(mode="after")
    def _check_registers(self) -> ModbusConfig:
        problems: list[str] = []
        owners: dict[tuple[str, str], int] = {}
        for index, register in enumerate(self.registers):
            where = f"registers[{index}]"
            well = register.well_id or self.well_id
            if well is None:
                problems.append(f"{where}.well_id: is required (here or for the whole source)")
                continue
            if register.poll_interval is not None:
                try:
                    _check_interval(register.poll_interval)
                except ValueError as exc:
                    problems.append(f"{where}.poll_interval: {exc}")
            first = owners.setdefault((well, register.parameter), index)
            if first != index:
                problems.append(
                    f"{where}: {well} {register.parameter} is already read by registers[{first}]"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def build(self) -> Collector:
        from edge.collectors.modbus import Modbus

        return Modbus(self)


def _check_interval(value: timedelta) -> timedelta:
    if value < timedelta(milliseconds=10):
        raise ValueError("must be at least 10ms")
    return value
