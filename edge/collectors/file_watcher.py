"""The ``file_watcher`` collector: CSV files dropped into a directory become points.

How a file travels:

1. **Arrival.** A file in ``watch_directory`` whose name matches ``file_pattern`` and none of
   ``ignore_patterns`` (temporary names such as ``*.tmp``, ``*.part``: a writer that writes
   under such a name and renames when done is picked up after the rename) is noted, from a
   change event (watchfiles), from the scan at start (files that arrived while the agent was
   down) or from the scan every ``rescan_interval`` (shares whose changes raise no events).
2. **Settling.** A noted file is read only once its size and modification time have stayed the
   same for ``settle_time``, so a file still being written is not read half-way.
3. **Reading.** The first line is the header. Rows are read as a stream, ``chunk_rows`` at a
   time: each chunk's readings are emitted together with the file's progress (name, size,
   modification time, byte offset, line, rows done) as the source's watermark, so memory stays
   bounded whatever the file's size, and a crash mid-file resumes after the last durable chunk
   instead of from the top. One file is read at a time, oldest first.
4. **Bad rows.** A row with the wrong number of fields, a timestamp that does not parse, an
   empty well id, a cell that is not a number, text that is not valid in ``encoding`` or a line
   the csv module refuses is rejected whole (the other rows go on) and written, with its line
   number and the reason, to ``<stem>.rejected.csv`` beside the archived file. An empty cell is
   no error: the value is missing, and the transform counts it (``no_value``). A file that
   cannot be read at all (no header, no timestamp or well id column, no mapped column, a name
   the well id pattern does not match) is rejected as a whole the same way, with one line
   saying why.
5. **Archiving.** Only after the last chunk's emit has returned (every point of the file is
   durable in the buffer) is the file moved to ``archive_directory``; a name already taken
   there gets a number (``report.1.csv``).

Timestamps are the file's: a naive one is in ``timezone``; an ISO 8601 one with an offset keeps
it. Every value is GOOD (CSV has no quality column). The tag of a reading is its CSV column.

Errors: a missing ``watch_directory`` (a share not mounted yet) or an archive directory that
cannot be created or written to raise ``CollectorError(retryable=True)``, and the agent restarts
the collector with backoff. A file that cannot be read (permissions, vanished) is logged and
left where it is, to be tried again at the next rescan; the other files go on.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from operator import methodcaller
from pathlib import Path
from stat import S_ISREG
from typing import IO, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import watchfiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.collectors.base import Collector, CollectorError, ReadingSink, SourceConfig
from edge.readings import Quality, Reading
from ingest_service.config import Duration

__all__ = [
    "WATERMARK_KEY",
    "CsvColumn",
    "FileReport",
    "FileWatcher",
    "FileWatcherConfig",
    "TimeZoneName",
    "TimestampFormat",
    "TimestampParser",
    "check_timestamp_format",
    "check_timezone",
]

log = logging.getLogger(__name__)

# The one watermark of the source: the file being read and how far (see ``_Progress``).
WATERMARK_KEY = "file"
# How often the watcher wakes without events, at most, to see whether noted files settled.
_MAX_TICK = 0.5
_MIN_TICK = 0.05

# --- timestamps (shared with the sql collector) ----------------------------------------------

TIMESTAMP_FORMATS_HELP = (
    "'iso' (ISO 8601), 'unix' (seconds since 1970), 'unix_ms' (milliseconds) "
    "or a strptime format such as '%d/%m/%Y %H:%M:%S'"
)


def check_timestamp_format(value: str) -> str:
    """``value`` if it is a timestamp format this module parses; ``ValueError`` if not."""
    if value in ("iso", "unix", "unix_ms"):
        return value
    if "%" not in value:
        raise ValueError(f"{value!r} is not a timestamp format: use {TIMESTAMP_FORMATS_HELP}")
    try:
        sample = datetime(2001, 2, 3, 4, 5, 6).strftime(value)
        datetime.strptime(sample, value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a usable strptime format: {exc}") from None
    return value


def check_timezone(value: str) -> str:
    """``value`` if it is an IANA time zone name (``UTC``, ``Europe/London``)."""
    if value == "UTC":
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{value!r} is not a time zone name such as 'UTC' or 'Europe/London'"
        ) from None
    return value


# Configuration fields checked by the functions above (the file_watcher and sql sources).
TimestampFormat = Annotated[str, AfterValidator(check_timestamp_format)]
TimeZoneName = Annotated[str, AfterValidator(check_timezone)]


def _zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


class TimestampParser:
    """Text or a database value → an aware UTC datetime, per a format and a time zone.

    A naive time (no offset) is taken to be in ``timezone``; one with an offset keeps it. A date
    without a time is midnight in ``timezone``. Local times that a daylight-saving change
    skips or repeats take the first reading of the clock (``fold=0``)."""

    def __init__(self, format: str = "iso", timezone: str = "UTC") -> None:
        self.format = check_timestamp_format(format)
        self.zone = _zone(check_timezone(timezone))
        self._utc = self.zone is UTC
        self.parse: Callable[[str], datetime] = self._select()

    def _local(self, naive: datetime) -> datetime:
        if self._utc:
            return naive.replace(tzinfo=UTC)
        return naive.replace(tzinfo=self.zone).astimezone(UTC)

    def _select(self) -> Callable[[str], datetime]:
        fmt = self.format
        from_iso = datetime.fromisoformat
        local = self._local
        if fmt == "iso":

            def parse_iso(text: str) -> datetime:
                try:
                    instant = from_iso(text)
                except ValueError:
                    instant = from_iso(text.strip())  # raises with Python's message
                if instant.tzinfo is None:
                    return local(instant)
                # "+00:00" and "Z" parse to the UTC singleton: nothing to convert.
                return instant if instant.tzinfo is UTC else instant.astimezone(UTC)

            return parse_iso
        if fmt in ("unix", "unix_ms"):

            def parse_unix(text: str) -> datetime:
                return self.from_number(float(text))

            return parse_unix
        strptime = datetime.strptime

        def parse_format(text: str) -> datetime:
            instant = strptime(text.strip(), fmt)
            if instant.tzinfo is None:
                return local(instant)
            return instant.astimezone(UTC)

        return parse_format

    def from_number(self, number: float) -> datetime:
        """Seconds (``unix``) or milliseconds (``unix_ms``) since 1970 as a UTC datetime."""
        seconds = number / 1000.0 if self.format == "unix_ms" else number
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{number!r} is out of the range of timestamps") from None

    def from_value(self, value: object) -> datetime:
        """A value from a database column: a datetime, a date, text, or a number (with the
        ``unix``/``unix_ms`` formats). ``ValueError`` with the reason when it is none of these."""
        if isinstance(value, datetime):
            return self._local(value) if value.tzinfo is None else value.astimezone(UTC)
        if isinstance(value, date):
            return self._local(datetime(value.year, value.month, value.day))
        if isinstance(value, str):
            return self.parse(value)
        if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
            if self.format not in ("unix", "unix_ms"):
                raise ValueError(
                    f"{value!r} is a number: set timestamp_format to 'unix' or 'unix_ms'"
                )
            return self.from_number(float(value))
        raise ValueError(f"{type(value).__name__} {value!r} is not a time")


# --- configuration --------------------------------------------------------------------------


class CsvColumn(BaseModel):
    """One CSV column that becomes one point per row: the spec's ``mapping`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    csv_column: str = Field(min_length=1, description="The column's name in the header.")
    parameter: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    unit: str = Field(min_length=1, description="The unit the column is written in.")


class FileWatcherConfig(SourceConfig):
    """CSV files dropped into a directory; see the module docstring."""

    type: Literal["file_watcher"] = "file_watcher"
    watch_directory: Path
    file_pattern: str = Field(default="*.csv", min_length=1)
    archive_directory: Path
    # Names a writer uses while a file is incomplete; such files wait until renamed.
    ignore_patterns: tuple[str, ...] = ("*.tmp", "*.part", "*.partial", "*.filepart", ".*", "~*")
    settle_time: Duration = timedelta(seconds=2)
    rescan_interval: Duration = Field(default=timedelta(seconds=60), gt=timedelta(0))
    # Where the well id comes from: a column, or the file name (a regex with a ``well_id``
    # group, searched in the name). Exactly one of the two.
    well_id_column: str | None = Field(default=None, min_length=1)
    well_id_pattern: str | None = Field(default=None, min_length=1)
    timestamp_column: str = Field(min_length=1)
    timestamp_format: TimestampFormat = "iso"
    timezone: TimeZoneName = "UTC"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    decimal_separator: Literal[".", ","] = "."
    encoding: str = "utf-8-sig"
    chunk_rows: int = Field(default=5_000, ge=1, le=100_000)
    mapping: tuple[CsvColumn, ...]

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"{value!r} is not a text encoding (e.g. utf-8, cp1252)") from None
        return value

    @field_validator("well_id_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a regular expression: {exc}") from None
        if "well_id" not in compiled.groupindex:
            raise ValueError("needs a named group (?P<well_id>...) that captures the well id")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FileWatcherConfig:
        # Not Field(min_length=1): pydantic would also call the list empty when an entry is
        # invalid.
        if not self.mapping:
            raise ValueError("mapping must map at least one column")
        if (self.well_id_column is None) == (self.well_id_pattern is None):
            raise ValueError("set exactly one of well_id_column and well_id_pattern")
        columns = [c.csv_column for c in self.mapping]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"mapping: columns {repeated} are mapped more than once")
        for special in (self.timestamp_column, self.well_id_column):
            if special in columns:
                raise ValueError(f"mapping: {special!r} is the timestamp or well id column")
        if self.decimal_separator == "," and self.delimiter == ",":
            raise ValueError("decimal_separator ',' needs another delimiter, e.g. ';'")
        watch = self.watch_directory.resolve()
        archive = self.archive_directory.resolve()
        if archive == watch:
            raise ValueError("archive_directory must not be the watch_directory")
        return self

    def build(self) -> Collector:
        return FileWatcher(self)


# --- progress (the watermark) ---------------------------------------------------------------


@dataclass(slots=True)
class _Progress:
    """How far one file has been read; stored as JSON under ``WATERMARK_KEY``."""

    name: str
    size: int
    mtime_ns: int
    offset: int = 0  # bytes of the file read and emitted (0: nothing yet)
    line: int = 0  # lines read up to ``offset``
    rows: int = 0  # data rows read (accepted and rejected)
    rejected: int = 0  # rows rejected
    rejected_bytes: int = 0  # size of the rejected report written so far
    complete: bool = False
    archive_as: str | None = None  # the archive name chosen, once complete

    def same_file(self, name: str, stat: os.stat_result) -> bool:
        return (self.name, self.size, self.mtime_ns) == (name, stat.st_size, stat.st_mtime_ns)

    def dump(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "offset": self.offset,
                "line": self.line,
                "rows": self.rows,
                "rejected": self.rejected,
                "rejected_bytes": self.rejected_bytes,
                "complete": self.complete,
                "archive_as": self.archive_as,
            },
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, text: str) -> _Progress:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return cls(
            name=str(data["name"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            offset=int(data["offset"]),
            line=int(data["line"]),
            rows=int(data["rows"]),
            rejected=int(data["rejected"]),
            rejected_bytes=int(data["rejected_bytes"]),
            complete=bool(data["complete"]),
            archive_as=None if data.get("archive_as") is None else str(data["archive_as"]),
        )


@dataclass(frozen=True, slots=True)
class FileReport:
    """What became of one file."""

    name: str
    rows: int  # data rows read, accepted and rejected
    readings: int  # readings emitted (values, including empty cells)
    rejected: int  # rows rejected (or 1 for a file rejected as a whole)
    archived: Path
    rejected_report: Path | None
    resumed_at_row: int = 0  # rows skipped because an earlier run had emitted them


@dataclass(slots=True)
class _Chunk:
    readings: list[Reading] = field(default_factory=list)
    done: bool = False
    rejected: Counter[str] = field(default_factory=Counter)  # rows rejected, by reason


class _FileRejected(Exception):
    """The file cannot be read as CSV of the configured shape; the reason is the message."""


# --- reading one file (runs in a worker thread) ---------------------------------------------


class _CsvFile:
    """One open CSV file, read chunk by chunk from a byte offset, with its rejected report."""

    def __init__(self, config: FileWatcherConfig, path: Path, progress: _Progress,
                 report_path: Path) -> None:
        self._config = config
        self._path = path
        self._progress = progress
        self._report_path = report_path
        self._report: IO[str] | None = None
        self._report_writer: Any = None
        self._file: IO[bytes] = path.open("rb")
        self._lock = threading.Lock()
        # Physical line numbers: lines before the reader's first one, plus the reader's count,
        # plus lines the reader never counted (they could not be decoded).
        self._line_base = 0
        self._undecodable = 0
        self._rejected: Counter[str] = Counter()  # this chunk's rejected rows, by reason
        self._header: list[str] = []
        self._parse_time = TimestampParser(config.timestamp_format, config.timezone).parse
        try:
            self._start()
        except BaseException:
            self._file.close()
            raise

    @property
    def line(self) -> int:
        """The number of the last line read (the header is line 1)."""
        return self._line_base + self._reader.line_num + self._undecodable

    def _start(self) -> None:
        config = self._config
        first = self._file.readline()
        if not first:
            raise _FileRejected("the file is empty: there is no header line")
        try:
            text = first.decode(config.encoding)
            header = next(csv.reader([text], delimiter=config.delimiter), [])
        except UnicodeDecodeError:
            raise _FileRejected(f"the header line is not valid {config.encoding}") from None
        except csv.Error as exc:
            raise _FileRejected(f"the header line is not CSV: {exc}") from None
        self._header = [name.strip() for name in header]
        index: dict[str, int] = {}
        for position, name in enumerate(self._header):
            index.setdefault(name, position)
        missing = [
            name for name in (config.timestamp_column, config.well_id_column)
            if name is not None and name not in index
        ]
        if missing:
            raise _FileRejected(
                f"the header has no column {missing[0]!r} (its columns: "
                f"{', '.join(map(repr, self._header))})"
            )
        self._columns = [
            (index[c.csv_column], c.parameter, c.unit, c.csv_column)
            for c in config.mapping
            if c.csv_column in index
        ]
        absent = [c.csv_column for c in config.mapping if c.csv_column not in index]
        if not self._columns:
            raise _FileRejected(
                f"the header has none of the mapped columns ({', '.join(map(repr, absent))})"
            )
        if absent:
            log.warning(
                "file_watcher %s: %s has no column %s; its other columns are read",
                config.name, self._path.name, ", ".join(map(repr, absent)),
            )
        self._time_index = index[config.timestamp_column]
        self._well_index = index[config.well_id_column] if config.well_id_column else None
        self._file_well: str | None = None
        if config.well_id_pattern is not None:
            match = re.search(config.well_id_pattern, self._path.name)
            well = match.group("well_id") if match else None
            if not well:
                raise _FileRejected(
                    f"the file name does not match well_id_pattern {config.well_id_pattern!r}"
                )
            self._file_well = well
        progress = self._progress
        header_end = self._file.tell()
        if progress.offset > header_end:
            # Resume after the rows an earlier run emitted.
            self._file.seek(progress.offset)
            self._line_base = progress.line
        else:
            progress.offset, progress.line = header_end, 1
            self._line_base = 1
        # Lines are read and decoded in C (no Python frame per line), and the csv reader never
        # reads ahead of the row it returns: after each row the file's position is exactly the
        # end of that row. A byte order mark is only ever at the start of the file.
        encoding = config.encoding
        if codecs.lookup(encoding).name == "utf-8-sig":
            encoding = "utf-8"
        lines = map(methodcaller("decode", encoding), iter(self._file.readline, b""))
        self._reader = csv.reader(lines, delimiter=config.delimiter)
        if progress.rejected_bytes and self._report_path.exists():
            self._open_report(progress.rejected_bytes)
        else:
            # A report left by a run that stopped before its first durable chunk.
            self._report_path.unlink(missing_ok=True)
            progress.rejected_bytes = 0

    def _open_report(self, keep_bytes: int) -> None:
        """Open the rejected report: a new one, or the one of an earlier run cut to what its
        last durable chunk had written (rows after that are read and rejected again)."""
        if keep_bytes:
            self._report = self._report_path.open("r+", encoding="utf-8", newline="")
            self._report.truncate(keep_bytes)
            self._report.seek(keep_bytes)
            self._report_writer = csv.writer(self._report)
        else:
            self._report = self._report_path.open("w", encoding="utf-8", newline="")
            self._report_writer = csv.writer(self._report)
            self._report_writer.writerow(["line", "reason", *self._header])

    def _reject(self, line: int, kind: str, reason: str, row: list[str]) -> None:
        """Report the row at ``line`` with its ``reason``, and count it by ``kind`` (the
        reason's fixed name, for the agent's metric)."""
        if self._report is None:
            self._open_report(0)
        self._report_writer.writerow([line, reason, *row])
        self._progress.rejected += 1
        self._rejected[kind] += 1

    def next_chunk(self) -> _Chunk:
        """Read up to ``chunk_rows`` rows; their readings, and whether the file is done."""
        with self._lock:
            return self._next_chunk()

    def _next_chunk(self) -> _Chunk:
        config = self._config
        progress = self._progress
        chunk = _Chunk()
        readings = chunk.readings
        append = readings.append
        parse_time = self._parse_time
        decimal_comma = config.decimal_separator == ","
        time_index = self._time_index
        well_index = self._well_index
        file_well = self._file_well
        columns = self._columns
        width = len(self._header)
        good = Quality.GOOD
        rows = 0
        reader = self._reader
        base = self._line_base
        previous_end = self.line
        for _ in range(config.chunk_rows):
            try:
                row = next(reader)
            except StopIteration:
                chunk.done = True
                break
            except (UnicodeDecodeError, csv.Error) as exc:
                # A line that is not text in the encoding, or not CSV (a field beyond the
                # csv module's size limit): the reader goes on with the next line.
                rows += 1
                if isinstance(exc, UnicodeDecodeError):
                    self._undecodable += 1
                    kind, reason = "not_text", f"not valid {config.encoding}"
                else:
                    kind, reason = "not_csv", f"not CSV: {exc}"
                self._reject(previous_end + 1, kind, reason, [])
                previous_end = self.line
                continue
            first_line = previous_end + 1
            previous_end = base + reader.line_num + self._undecodable
            if not row:
                continue  # a blank line
            rows += 1
            if len(row) != width:
                self._reject(
                    first_line, "field_count", f"{len(row)} fields, the header has {width}", row
                )
                continue
            text = row[time_index]
            try:
                timestamp = parse_time(text)
            except (ValueError, OverflowError) as exc:
                self._reject(
                    first_line,
                    "bad_timestamp",
                    f"timestamp {text!r} does not match {config.timestamp_format!r}: {exc}",
                    row,
                )
                continue
            if well_index is not None:
                well = row[well_index].strip()
                if not well:
                    self._reject(first_line, "no_well_id",
                                 f"the well id ({config.well_id_column}) is empty", row)
                    continue
            else:
                assert file_well is not None
                well = file_well
            # Readings go straight into the chunk; a bad cell takes the row's back out.
            mark = len(readings)
            for index, parameter, unit, tag in columns:
                cell = row[index]
                value: float | None
                try:
                    value = float(cell.replace(",", ".") if decimal_comma else cell)
                except ValueError:
                    if cell and not cell.isspace():
                        del readings[mark:]
                        self._reject(
                            first_line, "not_numeric", f"{tag}: {cell!r} is not a number", row
                        )
                        break
                    value = None  # an empty cell: no value
                append(Reading(well, parameter, timestamp, value, unit, good, tag))
        chunk.rejected, self._rejected = self._rejected, Counter()
        progress.rows += rows
        progress.offset = self._file.tell()
        progress.line = self.line
        if self._report is not None:
            self._report.flush()
            progress.rejected_bytes = self._report.tell()
        return chunk

    def close(self) -> None:
        # Waits for a chunk still being read in another thread (after a cancellation).
        with self._lock:
            self._file.close()
            if self._report is not None:
                self._report.close()


# --- the collector --------------------------------------------------------------------------


@dataclass(slots=True)
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # monotonic time from which size and mtime were seen unchanged


class FileWatcher:
    """The running watcher: implements ``Collector``; see the module docstring."""

    def __init__(self, config: FileWatcherConfig) -> None:
        self.config = config
        self._progress: _Progress | None = None
        self._archive_ready = False
        # Files noted, not yet read: name → what was seen last (None: not yet looked at).
        self._noted: dict[str, _Candidate | None] = {}
        self._settle = config.settle_time.total_seconds()
        tick = min(max(self._settle / 2, _MIN_TICK), _MAX_TICK)
        self._tick_ms = int(tick * 1000)

    # --- which files ---

    def wanted(self, name: str) -> bool:
        """Whether a file of this name is one to read (pattern, not a temporary name)."""
        config = self.config
        if not fnmatch.fnmatch(name, config.file_pattern):
            return False
        return not any(fnmatch.fnmatch(name, p) for p in config.ignore_patterns)

    def _scan(self) -> list[str]:
        directory = self.config.watch_directory
        try:
            with os.scandir(directory) as entries:
                return [e.name for e in entries if self.wanted(e.name) and e.is_file()]
        except FileNotFoundError:
            raise CollectorError(
                f"watch_directory {directory} does not exist (a share not mounted?)"
            ) from None
        except NotADirectoryError:
            raise CollectorError(f"watch_directory {directory} is not a directory") from None
        except PermissionError:
            raise CollectorError(f"watch_directory {directory} cannot be read") from None

    def _settled(self, now: float) -> list[tuple[str, os.stat_result]]:
        """The noted files whose size and mtime did not change for ``settle_time``, oldest
        first. Files gone meanwhile are forgotten."""
        ready: list[tuple[str, os.stat_result]] = []
        for name, seen in list(self._noted.items()):
            try:
                stat = (self.config.watch_directory / name).stat()
            except OSError:
                del self._noted[name]
                continue
            if not S_ISREG(stat.st_mode):
                del self._noted[name]  # a directory (or a device) with a matching name
                continue
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                seen = self._noted[name] = _Candidate(stat.st_size, stat.st_mtime_ns, now)
            if now - seen.since >= self._settle:
                ready.append((name, stat))
        ready.sort(key=lambda item: (item[1].st_mtime_ns, item[0]))
        return ready

    def _prepare_archive(self) -> None:
        archive = self.config.archive_directory
        try:
            archive.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CollectorError(f"cannot create archive_directory {archive}: {exc}") from None
        if not os.access(archive, os.W_OK | os.X_OK):
            raise CollectorError(f"archive_directory {archive} is not writable")
        self._archive_ready = True

    # --- the Collector interface ---

    async def probe(self) -> str:
        config = self.config
        files = await asyncio.to_thread(self._scan)
        if not os.access(config.watch_directory, os.R_OK | os.X_OK):
            raise CollectorError(f"watch_directory {config.watch_directory} cannot be read")
        archive = config.archive_directory
        if archive.exists():
            if not os.access(archive, os.W_OK | os.X_OK):
                raise CollectorError(f"archive_directory {archive} is not writable")
        elif not os.access(_existing_parent(archive), os.W_OK | os.X_OK):
            raise CollectorError(f"archive_directory {archive} cannot be created")
        return (
            f"watching {config.watch_directory} for {config.file_pattern!r}: "
            f"{len(files)} file(s) waiting; archive {archive}"
        )

    async def run(self, sink: ReadingSink) -> None:
        """Read every file that arrives (and every one already there) until cancelled."""
        config = self.config
        await asyncio.to_thread(self._prepare_archive)
        self._progress = await _load_progress(sink, config.name)
        for name in await asyncio.to_thread(self._scan):
            self._noted.setdefault(name, None)
        log.info(
            "file_watcher %s: watching %s for %r, %d file(s) waiting",
            config.name, config.watch_directory, config.file_pattern, len(self._noted),
        )
        rescan_interval = config.rescan_interval.total_seconds()
        next_rescan = time.monotonic() + rescan_interval
        watch_dir = str(config.watch_directory)
        try:
            async for changes in watchfiles.awatch(
                watch_dir,
                watch_filter=lambda _change, path: self.wanted(os.path.basename(path)),
                debounce=self._tick_ms,
                step=min(50, self._tick_ms),
                rust_timeout=self._tick_ms,
                yield_on_timeout=True,
                recursive=False,
                ignore_permission_denied=True,
            ):
                for change, path in changes:
                    name = os.path.basename(path)
                    if change == watchfiles.Change.deleted:
                        self._noted.pop(name, None)
                    else:
                        self._noted[name] = None
                now = time.monotonic()
                if now >= next_rescan:
                    for name in await asyncio.to_thread(self._scan):
                        self._noted.setdefault(name, None)
                    next_rescan = now + rescan_interval
                if not self._noted:
                    continue
                for name, stat in await asyncio.to_thread(self._settled, now):
                    self._noted.pop(name, None)
                    await self._read_noted(sink, name, stat)
        except (FileNotFoundError, RuntimeError) as exc:
            # watchfiles raises these when the watched directory goes away.
            raise CollectorError(f"cannot watch {watch_dir}: {exc}") from exc

    async def _read_noted(self, sink: ReadingSink, name: str, stat: os.stat_result) -> None:
        path = self.config.watch_directory / name
        try:
            await self.process_file(path, sink, stat=stat)
        except OSError as exc:
            log.error(
                "file_watcher %s: cannot read %s: %s; trying again at the next rescan",
                self.config.name, name, exc,
            )

    async def process_file(
        self, path: Path, sink: ReadingSink, *, stat: os.stat_result | None = None
    ) -> FileReport:
        """Read ``path`` into ``sink`` chunk by chunk, then archive it. Resumes from the
        source's watermark when it describes this very file."""
        config = self.config
        started = time.monotonic()
        name = path.name
        if stat is None:
            stat = await asyncio.to_thread(path.stat)
        if not self._archive_ready:
            await asyncio.to_thread(self._prepare_archive)
        if self._progress is None:
            self._progress = await _load_progress(sink, config.name)
        progress = self._progress
        if progress is not None and progress.same_file(name, stat):
            resumed_at = progress.rows
            if progress.complete:
                log.info(
                    "file_watcher %s: %s was read completely before a restart; archiving it",
                    config.name, name,
                )
                return await self._archive(path, progress, resumed_at, 0, started)
            log.info(
                "file_watcher %s: resuming %s at line %d (%d rows were emitted before)",
                config.name, name, progress.line + 1, progress.rows,
            )
        else:
            progress = _Progress(name=name, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
            resumed_at = 0
        self._progress = progress
        report_path = self._report_part(name)
        readings = 0
        try:
            reader = await asyncio.to_thread(_CsvFile, config, path, progress, report_path)
        except _FileRejected as exc:
            log.error("file_watcher %s: %s rejected: %s", config.name, name, exc)
            await asyncio.to_thread(_write_file_rejection, report_path, str(exc))
            progress.rejected = 1
            sink.reject("bad_file")
        else:
            # Parsing runs in a worker thread (file I/O, and the event loop stays responsive);
            # one chunk is in memory at a time. (Parsing the next chunk while the buffer
            # commits this one was measured: no gain, the work is bound by the GIL.)
            try:
                while True:
                    chunk = await asyncio.to_thread(reader.next_chunk)
                    if chunk.done:
                        progress.complete = True
                        progress.archive_as = await asyncio.to_thread(
                            self._archive_name, name
                        )
                    await sink.emit(chunk.readings, {WATERMARK_KEY: progress.dump()})
                    readings += len(chunk.readings)
                    for kind, count in chunk.rejected.items():
                        sink.reject(kind, count)
                    if chunk.done:
                        break
            finally:
                await asyncio.to_thread(reader.close)
        if not progress.complete:
            # A file rejected as a whole: nothing to emit, but its end is recorded before it
            # is moved, like any other file's.
            progress.complete = True
            progress.archive_as = await asyncio.to_thread(self._archive_name, name)
            await sink.emit([], {WATERMARK_KEY: progress.dump()})
        return await self._archive(path, progress, resumed_at, readings, started)

    # --- archiving ---

    def _report_part(self, name: str) -> Path:
        """Where the rejected report of ``name`` is written while the file is read."""
        return self.config.archive_directory / f".{name}.rejected.part"

    def _archive_name(self, name: str) -> str:
        """A name free in the archive for the file and for its rejected report."""
        archive = self.config.archive_directory
        stem, suffix = os.path.splitext(name)
        candidate, number = name, 0
        while (archive / candidate).exists() or (archive / _report_name(candidate)).exists():
            number += 1
            candidate = f"{stem}.{number}{suffix}"
        return candidate

    async def _archive(
        self, path: Path, progress: _Progress, resumed_at: int, readings: int, started: float
    ) -> FileReport:
        config = self.config
        archive = config.archive_directory
        target = progress.archive_as or progress.name
        if (archive / target).exists():
            target = await asyncio.to_thread(self._archive_name, progress.name)
        report: Path | None = None
        part = self._report_part(progress.name)
        if await asyncio.to_thread(part.exists):
            report = archive / _report_name(target)
            await asyncio.to_thread(_move, part, report)
        destination = archive / target
        await asyncio.to_thread(_move, path, destination)
        elapsed = time.monotonic() - started
        log.info(
            "file_watcher %s: %s: %d rows (%d rejected), %d readings in %.1f s; archived as %s",
            config.name, progress.name, progress.rows - resumed_at, progress.rejected, readings,
            elapsed, destination,
        )
        return FileReport(
            name=progress.name,
            rows=progress.rows,
            readings=readings,
            rejected=progress.rejected,
            archived=destination,
            rejected_report=report,
            resumed_at_row=resumed_at,
        )


def _report_name(archived_name: str) -> str:
    return f"{os.path.splitext(archived_name)[0]}.rejected.csv"


def _write_file_rejection(report: Path, reason: str) -> None:
    with report.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["line", "reason"])
        writer.writerow([0, reason])


def _move(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; across file systems, copy to a temporary name beside
    the target, rename that, then delete the source (a crash leaves no half-copied target)."""
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = target.with_name(f".{target.name}.moving")
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)


def _existing_parent(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


async def _load_progress(sink: ReadingSink, source: str) -> _Progress | None:
    stored = await sink.watermark(WATERMARK_KEY)
    if stored is None:
        return None
    try:
        return _Progress.load(stored)
    except (ValueError, KeyError, TypeError):
        log.warning("file_watcher %s: watermark %r is not a file's progress; ignored",
                    source, stored[:200])
        return None
