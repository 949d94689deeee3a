"""The configuration of the ``sql`` source (``SqlConfig``); the collector is in
``edge.collectors.sql``, imported by ``build()``.

Kept apart so that loading an agent's configuration does not load SQLAlchemy (30 MiB) unless
an ``sql`` source is configured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.collectors.base import Collector, SourceConfig
from edge.collectors.file_watcher import TimestampFormat, TimeZoneName
from ingest_service.config import Duration

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "DRIVERS",
    "SqlConfig",
    "SqlConnection",
    "SqlMapping",
    "SqlQuery",
    "SqlValueColumn",
    "SqlWatermark",
]

# ``driver:`` → the SQLAlchemy async dialect+driver it means.
DRIVERS: Mapping[str, str] = {
    "sqlserver": "mssql+aioodbc",
    "postgresql": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
    "sqlite": "sqlite+aiosqlite",
}
# A URL's scheme without a driver → the async driver used for it.
_BARE_SCHEMES: Mapping[str, str] = {
    "mssql": "mssql+aioodbc",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
    "sqlite": "sqlite+aiosqlite",
}
_ASYNC_DRIVERS = frozenset(
    {*DRIVERS.values(), "mysql+asyncmy", "mariadb+asyncmy"}
)
_DEFAULT_ODBC_DRIVER = "ODBC Driver 18 for SQL Server"
# How SQLAlchemy finds bound parameters in text(): ``:since`` not preceded by ``:``, a word
# character or a backslash.
_SINCE = re.compile(r"(?<![:\w\\]):since\b")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SqlConnection(_Strict):
    """How to reach the database: a ``url``, or ``driver`` with host, port, database and
    credentials as in the spec. Exactly one of ``url`` and ``driver``."""

    url: SecretStr | None = None
    driver: Literal["sqlserver", "postgresql", "mysql", "mariadb", "sqlite"] | None = None
    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    database: str | None = Field(default=None, min_length=1)
    username: str | None = None
    password: SecretStr | None = None
    # Query parameters of the URL: driver options (``TrustServerCertificate: "yes"``, ``ssl``).
    options: dict[str, str] = Field(default_factory=dict)
    connect_timeout: Duration = Field(default=timedelta(seconds=10), gt=timedelta(0))

    @model_validator(mode="after")
    def _one_way(self) -> SqlConnection:
        # Checked here rather than on ``url``: the loader shows no message about a secret
        # field's value, and these never repeat the URL (it may hold a password).
        fields = ("host", "port", "database", "username", "password")
        if self.url is not None:
            given = [name for name in fields if getattr(self, name) is not None]
            if self.driver is not None or given:
                raise ValueError(
                    f"give either url or driver with {', '.join(fields)}, not both"
                )
            # SQLAlchemy is imported here and below, not with the module: it is only loaded
            # when an sql source is configured.
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                url = make_url(self.url.get_secret_value())
            except ArgumentError:
                raise ValueError(
                    "url is not a database URL such as "
                    "postgresql+asyncpg://user:password@host/database"
                ) from None
            driver = _BARE_SCHEMES.get(url.drivername, url.drivername)
            if driver not in _ASYNC_DRIVERS:
                raise ValueError(
                    f"url: driver {url.drivername!r} is not one the agent can use; use one of "
                    f"{', '.join(sorted(_ASYNC_DRIVERS))}"
                )
            return self
        if self.driver is None:
            raise ValueError("give url, or driver with host, port, database, username, password")
        if self.database is None:
            raise ValueError(
                "database is required (for sqlite: the path of the database file)"
            )
        if self.driver == "sqlite":
            extra = [name for name in ("host", "port", "username", "password")
                     if getattr(self, name) is not None]
            if extra:
                raise ValueError(f"sqlite takes only database (a file path), not {extra[0]}")
        elif self.host is None:
            raise ValueError(f"host is required for driver {self.driver}")
        return self

    def engine_url(self) -> URL:
        """The SQLAlchemy URL, with the async driver."""
        from sqlalchemy.engine import URL, make_url

        if self.url is not None:
            url = make_url(self.url.get_secret_value())
            url = url.set(drivername=_BARE_SCHEMES.get(url.drivername, url.drivername))
            return url.update_query_dict(self.options) if self.options else url
        assert self.driver is not None
        options = dict(self.options)
        if self.driver == "sqlserver":
            options.setdefault("driver", _DEFAULT_ODBC_DRIVER)
        return URL.create(
            DRIVERS[self.driver],
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            host=self.host,
            port=self.port,
            database=self.database,
            query=options,
        )

    def describe(self) -> str:
        """The URL without its password, for logs and ``test-connections``."""
        return self.engine_url().render_as_string(hide_password=True)


class SqlValueColumn(_Strict):
    """A numeric column of the result: one point per row, of ``parameter`` in ``unit``."""

    column: str = Field(min_length=1)
    parameter: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    unit: str = Field(min_length=1)


class SqlMapping(_Strict):
    """Which result column is what. ``well_id`` names the column holding the well id; ``well``
    gives one well id for every row instead. Exactly one of the two."""

    well_id: str | None = Field(default=None, min_length=1)
    well: str | None = Field(default=None, min_length=1)
    timestamp: str = Field(min_length=1)
    values: tuple[SqlValueColumn, ...]

    @model_validator(mode="after")
    def _consistent(self) -> SqlMapping:
        if not self.values:
            raise ValueError("values must map at least one column")
        if (self.well_id is None) == (self.well is None):
            raise ValueError("set exactly one of well_id (a column) and well (a fixed well id)")
        columns = [v.column.lower() for v in self.values]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"values: columns {repeated} are mapped more than once")
        for special in (self.timestamp, self.well_id):
            if special is not None and special.lower() in columns:
                raise ValueError(f"values: {special!r} is the timestamp or well id column")
        return self


class SqlWatermark(_Strict):
    """Which column's largest value is remembered, and the first run's ``:since``."""

    column: str | None = Field(default=None, min_length=1)
    # ``:since`` of the very first run: an ISO 8601 time (with an offset for a column with a
    # time zone, without one for one without), or a number or text for a key column.
    initial: int | str | None = None


class SqlQuery(_Strict):
    """One scheduled query, as in the spec's ``queries`` entries."""

    name: str = Field(pattern=_NAME)
    schedule: str = Field(min_length=1)
    query: str = Field(min_length=1)
    mapping: SqlMapping
    watermark: SqlWatermark = SqlWatermark()
    timeout: Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a cron expression such as '0 6 * * *' (06:00 every day); "
                "a sixth field gives seconds"
            )
        return value

    @model_validator(mode="after")
    def _initial(self) -> SqlQuery:
        column = self.watermark.column
        if (
            column is not None
            and column.lower() != self.mapping.timestamp.lower()
            and self.watermark.initial is None
        ):
            raise ValueError(
                f"watermark.initial is required when the watermark column ({column}) is not "
                "the timestamp column, e.g. 0 for an increasing id"
            )
        return self

    @property
    def watermark_column(self) -> str:
        return self.watermark.column or self.mapping.timestamp

    @property
    def uses_since(self) -> bool:
        return _SINCE.search(self.query) is not None


class SqlConfig(SourceConfig):
    """Scheduled SQL queries; see the module docstring."""

    type: Literal["sql"] = "sql"
    connection: SqlConnection
    queries: tuple[SqlQuery, ...]
    # The site's time zone: the schedules' hours, and timestamps the database gives without
    # one, are in it.
    timezone: TimeZoneName = "UTC"
    # How to read a timestamp column that holds text (SQLite, or a VARCHAR column).
    timestamp_format: TimestampFormat = "iso"
    run_on_start: bool = True
    fetch_rows: int = Field(default=5_000, ge=1, le=100_000)

    @field_validator("queries")
    @classmethod
    def _unique(cls, value: tuple[SqlQuery, ...]) -> tuple[SqlQuery, ...]:
        # Not Field(min_length=1): pydantic would also call the list empty when an entry
        # is invalid.
        if not value:
            raise ValueError("give at least one query")
        names = [q.name for q in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"query names {repeated} are used more than once")
        return value

    def build(self) -> Collector:
        from edge.collectors.sql import SqlCollector

        return SqlCollector(self)
