"""The configuration of the ``opcua`` source (``OpcUaConfig``); the collector is in
``edge.collectors.opcua``, imported by ``build()``.

Kept apart so that loading an agent's configuration does not load asyncua (35 MiB) unless an
``opcua`` source is configured.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.collectors.base import Collector, SourceConfig
from ingest_service.config import Duration

__all__ = ["OpcUaConfig", "OpcUaConnection", "OpcUaTag"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_node_id(text: str) -> str:
    # asyncua is imported here, not with the module: it is only loaded when an opcua source
    # is configured.
    from asyncua import ua
    from asyncua.ua.uaerrors import UaError

    try:
        ua.NodeId.from_string(text)
    except (UaError, ValueError):
        raise ValueError(
            f"{text!r} is not an OPC UA node id such as 'ns=2;s=WHP_WELL_001', 'ns=3;i=1001' "
            "or 'nsu=urn:vendor:tags;s=WHP_WELL_001'"
        ) from None
    return text


class OpcUaTag(_Strict):
    """One node of the server and what it measures."""

    node_id: str
    parameter: str = Field(min_length=1)
    well_id: str = Field(min_length=1)
    # None: the node's EngineeringUnits (EUInformation) display name.
    unit: str | None = Field(default=None, min_length=1)
    # Set: this tag is polled this often instead of subscribed (the spec's per-tag key).
    poll_interval: Duration | None = Field(default=None, gt=timedelta(0))
    # Absolute deadband of this tag's monitored item; overrides the source's.
    deadband: float | None = Field(default=None, ge=0)

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        return _check_node_id(value)


class OpcUaConnection(_Strict):
    """Where the server is and how to talk to it securely."""

    endpoint: str
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    security_policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep"] = "Basic256Sha256"
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    # The agent's own certificate and key; beside the buffer's default database (data/buffer.db).
    certificate_dir: Path = Path("data/pki")
    # The server's certificate, pinned (DER or PEM) ...
    server_certificate: Path | None = None
    # ... or a directory of trusted certificates (the server's own, or the CA that signed it).
    trust_dir: Path | None = None
    timeout: Duration = Field(default=timedelta(seconds=10), gt=timedelta(0))
    session_timeout: Duration = Field(
        default=timedelta(seconds=60), ge=timedelta(seconds=10), le=timedelta(hours=1)
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        if parts.scheme != "opc.tcp" or not host:
            raise ValueError("must be an opc.tcp:// URL, e.g. opc.tcp://10.0.1.50:4840")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials: use username and password")
        del port
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConnection:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: give both or neither")
        if self.security_mode == "None":
            if self.server_certificate is not None or self.trust_dir is not None:
                raise ValueError(
                    "server_certificate and trust_dir apply only with security_mode Sign or "
                    "SignAndEncrypt"
                )
        elif (self.server_certificate is None) == (self.trust_dir is None):
            raise ValueError(
                f"security_mode {self.security_mode} needs the server's certificate trusted: "
                "give either server_certificate (a pinned file) or trust_dir (a directory of "
                "trusted certificates), not both"
            )
        return self


class OpcUaConfig(SourceConfig):
    """An OPC UA server's tags, subscribed (the default) or polled."""

    type: Literal["opcua"] = "opcua"
    connection: OpcUaConnection
    # How tags without their own poll_interval are read.
    mode: Literal["subscribe", "poll"] = "subscribe"
    # 500 ms: with the buffer's linger and the upload, a change is stored within a second.
    publishing_interval: Duration = Field(
        default=timedelta(milliseconds=500), ge=timedelta(milliseconds=10), le=timedelta(hours=1)
    )
    # None: the publishing interval. 0: the server's fastest.
    sampling_interval: Duration | None = None
    queue_size: int = Field(default=100, ge=1, le=100_000)
    deadband: float | None = Field(default=None, ge=0)
    keepalive_count: int = Field(default=10, ge=1, le=10_000)
    watchdog_intervals: int = Field(default=30, ge=2, le=100_000)
    poll_interval: Duration = Field(default=timedelta(seconds=5), gt=timedelta(0))
    backfill_limit: Duration = timedelta(days=7)
    history_page_size: int = Field(default=1_000, ge=1, le=100_000)
    tags: tuple[OpcUaTag, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConfig:
        seen: dict[str, int] = {}
        for index, tag in enumerate(self.tags):
            if tag.node_id in seen:
                raise ValueError(
                    f"tags[{index}]: node_id {tag.node_id!r} is already tags[{seen[tag.node_id]}]; "
                    "each node is one tag (its watermark is kept per node id)"
                )
            seen[tag.node_id] = index
            if tag.deadband is not None and self._polled(tag):
                raise ValueError(
                    f"tags[{index}] ({tag.node_id}): deadband applies to subscribed tags only, "
                    "and this one is polled"
                )
        if self.mode == "subscribe" and "poll_interval" in self.model_fields_set:
            raise ValueError(
                "poll_interval applies with mode: poll; under mode: subscribe give a tag its own "
                "poll_interval to poll it"
            )
        if self.watchdog_intervals <= self.keepalive_count:
            raise ValueError(
                f"watchdog_intervals ({self.watchdog_intervals}) must be more than keepalive_count "
                f"({self.keepalive_count}): a quiet but healthy subscription sends a keep-alive "
                "every keepalive_count publishing intervals"
            )
        return self

    def _polled(self, tag: OpcUaTag) -> bool:
        return tag.poll_interval is not None or self.mode == "poll"

    def poll_seconds(self, tag: OpcUaTag) -> float | None:
        """How often ``tag`` is polled, or None when it is subscribed."""
        if tag.poll_interval is not None:
            return tag.poll_interval.total_seconds()
        return self.poll_interval.total_seconds() if self.mode == "poll" else None

    def build(self) -> Collector:
        from edge.collectors.opcua import OpcUaCollector

        return OpcUaCollector(self)
