"""The ``file_watcher`` collector with real files in temporary directories.

What is shown: a well-formed file becomes its readings and is archived; bad rows are rejected
whole with their line numbers and reasons into ``<stem>.rejected.csv`` while the good rows go
on; a file that cannot be read at all is rejected as a whole; a 1 M-row file is streamed in
bounded memory; a crash mid-file resumes without emitting a row twice; files that arrived while
the agent was down are read at start; a half-written file and a temporary name wait; and a file
is archived only once its points are durable (the sink's emit has returned).
"""

from __future__ import annotations

import asyncio
import csv
import gc
import os
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edge.collectors.base import CollectorError
from edge.collectors.file_watcher import (
    WATERMARK_KEY,
    FileReport,
    FileWatcher,
    FileWatcherConfig,
    TimestampParser,
)
from edge.readings import Quality, Reading
from tests.collector_support import MemorySink, load_sample, sample_text

ROOT = Path(__file__).parents[2]
HEADER = "Timestamp,Well,Wellhead Pressure (psi),Hookload (klbs),Comment\n"
T0 = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)


class CrashingSink(MemorySink):
    """Fails (like ``kill -9``: nothing of that emit is kept) at emit number ``crash_at``."""

    def __init__(self, crash_at: int, base: MemorySink) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.readings, self.watermarks = base.readings, base.watermarks

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        if self.emits + 1 == self.crash_at:
            raise RuntimeError("the agent died")
        await super().emit(readings, watermarks)


class GatedSink(MemorySink):
    """Its emit waits until ``release`` is set: the buffer is slow to make points durable."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        self.entered.set()
        await self.release.wait()
        await super().emit(readings, watermarks)


def settings(tmp_path: Path, **overrides: Any) -> FileWatcherConfig:
    base: dict[str, Any] = {
        "name": "csv",
        "watch_directory": str(tmp_path / "in"),
        "archive_directory": str(tmp_path / "archive"),
        "well_id_column": "Well",
        "timestamp_column": "Timestamp",
        "settle_time": "100ms",
        "mapping": [
            {"csv_column": "Wellhead Pressure (psi)", "parameter": "wellhead_pressure",
             "unit": "psi"},
            {"csv_column": "Hookload (klbs)", "parameter": "hookload", "unit": "klbs"},
        ],
    }
    base.update(overrides)
    (tmp_path / "in").mkdir(exist_ok=True)
    return FileWatcherConfig.model_validate(base)


def watcher(tmp_path: Path, **overrides: Any) -> FileWatcher:
    built = settings(tmp_path, **overrides).build()
    assert isinstance(built, FileWatcher)
    (tmp_path / "archive").mkdir(exist_ok=True)
    return built


def rows(count: int, *, start: int = 0, well: str = "WELL-001") -> str:
    return "".join(
        f"{(T0 + timedelta(seconds=i)).isoformat()},{well},{2000 + i}.5,{300 + i % 50},ok\n"
        for i in range(start, start + count)
    )


def expected(count: int, *, start: int = 0, well: str = "WELL-001") -> set[Any]:
    return {
        (well, parameter, T0 + timedelta(seconds=i))
        for i in range(start, start + count)
        for parameter in ("wellhead_pressure", "hookload")
    }


async def poll(condition: Callable[[], bool], timeout: float = 15) -> None:
    """Wait until ``condition()`` holds (the condition is what is tested, not the time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_well_formed_file_becomes_readings_and_is_archived(tmp_path: Path) -> None:
    source = tmp_path / "in" / "WELL-001_2026-02-01.csv"
    source.parent.mkdir()
    source.write_text(HEADER + rows(10))
    sink = MemorySink()
    report = await watcher(tmp_path).process_file(source, sink)
    assert (report.rows, report.readings, report.rejected) == (10, 20, 0)
    assert set(sink.identities()) == expected(10) and len(sink.readings) == 20
    first = next(r for r in sink.readings if r.parameter == "wellhead_pressure")
    assert (first.value, first.unit, first.quality, first.tag) == (
        2000.5, "psi", Quality.GOOD, "Wellhead Pressure (psi)"
    )
    assert not source.exists()
    assert report.archived == tmp_path / "archive" / source.name
    assert report.archived.read_text() == HEADER + rows(10)
    assert report.rejected_report is None
    assert list((tmp_path / "archive").iterdir()) == [report.archived]


async def test_bad_rows_are_rejected_with_line_numbers_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    lines = [
        HEADER.encode(),
        b"2026-02-01T00:00:00+00:00,WELL-001,100,10,ok\n",  # line 2: good
        b"2026-02-01T00:00:01+00:00,WELL-001,101\n",  # 3: too few fields
        b"yesterday,WELL-001,102,12,ok\n",  # 4: bad time
        b"2026-02-01T00:00:03+00:00,WELL-001,n/a,13,ok\n",  # 5: not a number
        b"\n",  # 6: blank, ignored
        b'2026-02-01T00:00:04+00:00,WELL-001,104,,"two\nlines"\n',  # 7-8: empty hookload
        b"2026-02-01T00:00:05+00:00, ,105,15,ok\n",  # 9: empty well id
        b"2026-02-01T00:00:06+00:00,WELL-001,106,16,caf\xe9\n",  # 10: not UTF-8
        b"2026-02-01T00:00:07+00:00,WELL-001,107,17,ok,extra\n",  # 11: too many fields
        b"2026-02-01T00:00:09,WELL-001,109,19," + b"x" * 200_000 + b"\n",  # 12: huge field
        b"2026-02-01T00:00:08+00:00,WELL-001,108,18,ok",  # 13: good, no final newline
    ]
    source = tmp_path / "in" / "day.csv"
    source.parent.mkdir()
    source.write_bytes(b"".join(lines))
    sink = MemorySink()
    report = await watcher(tmp_path, chunk_rows=3).process_file(source, sink)
    assert (report.rows, report.rejected) == (10, 7)
    values = {(r.parameter, r.timestamp.second): r.value for r in sink.readings}
    assert values == {
        ("wellhead_pressure", 0): 100.0, ("hookload", 0): 10.0,
        ("wellhead_pressure", 4): 104.0, ("hookload", 4): None,  # an empty cell: no value
        ("wellhead_pressure", 8): 108.0, ("hookload", 8): 18.0,
    }
    assert report.rejected_report == tmp_path / "archive" / "day.rejected.csv"
    with report.rejected_report.open(newline="") as rejected:
        found = [(int(row[0]), row[1]) for row in list(csv.reader(rejected))[1:]]
    assert [line for line, _ in found] == [3, 4, 5, 9, 10, 11, 12]
    reasons = dict(found)
    assert reasons[3] == "3 fields, the header has 5"
    assert reasons[4].startswith("timestamp 'yesterday' does not match 'iso'")
    assert reasons[5] == "Wellhead Pressure (psi): 'n/a' is not a number"
    assert reasons[9] == "the well id (Well) is empty"
    assert reasons[10] == "not valid utf-8-sig"
    assert reasons[11] == "6 fields, the header has 5"
    assert reasons[12] == "not CSV: field larger than field limit (131072)"
    # Counted by reason for the agent's metric (ingestion_source_records_rejected_total).
    assert sink.rejected == {"field_count": 2, "bad_timestamp": 1, "not_numeric": 1,
                             "no_well_id": 1, "not_text": 1, "not_csv": 1}
    # The rejected report keeps the header and the row, so it can be fixed and dropped again.
    with report.rejected_report.open(newline="") as rejected:
        table = list(csv.reader(rejected))
    assert table[0] == ["line", "reason", "Timestamp", "Well", "Wellhead Pressure (psi)",
                        "Hookload (klbs)", "Comment"]
    assert table[3][2:] == ["2026-02-01T00:00:03+00:00", "WELL-001", "n/a", "13", "ok"]
    assert not source.exists() and (tmp_path / "archive" / "day.csv").exists()


@pytest.mark.parametrize(
    ("content", "name", "reason"),
    [
        ("", "empty.csv", "the file is empty: there is no header line"),
        ("Time,Well,Wellhead Pressure (psi)\n", "no_time.csv", "the header has no column "
         "'Timestamp' (its columns: 'Time', 'Well', 'Wellhead Pressure (psi)')"),
        ("Timestamp,Well,Other\n", "no_mapped.csv", "the header has none of the mapped "
         "columns ('Wellhead Pressure (psi)', 'Hookload (klbs)')"),
    ],
)
async def test_a_file_that_cannot_be_read_is_rejected_whole(
    tmp_path: Path, content: str, name: str, reason: str
) -> None:
    source = tmp_path / "in" / name
    source.parent.mkdir()
    source.write_text(content)
    sink = MemorySink()
    report = await watcher(tmp_path).process_file(source, sink)
    assert (report.rows, report.readings, report.rejected) == (0, 0, 1)
    assert report.rejected_report is not None
    with report.rejected_report.open(newline="") as rejected:
        assert list(csv.reader(rejected)) == [["line", "reason"], ["0", reason]]
    assert report.archived.exists() and not source.exists()
    assert sink.rejected == {"bad_file": 1}
    # Its end was recorded like any other file's.
    assert '"complete":true' in sink.watermarks[WATERMARK_KEY]


async def test_the_well_id_from_the_file_name(tmp_path: Path) -> None:
    pattern = r"^(?P<well_id>[A-Z]+-\d+)_"
    (tmp_path / "in").mkdir()
    good = tmp_path / "in" / "NS-042_daily.csv"
    good.write_text("Timestamp,Wellhead Pressure (psi)\n2026-02-01 06:00:00,1500\n")
    odd = tmp_path / "in" / "daily.csv"
    odd.write_text("Timestamp,Wellhead Pressure (psi)\n2026-02-01 06:00:00,1500\n")
    collector = watcher(tmp_path, well_id_column=None, well_id_pattern=pattern)
    sink = MemorySink()
    await collector.process_file(good, sink)
    assert [(r.well_id, r.timestamp) for r in sink.readings] == [
        ("NS-042", datetime(2026, 2, 1, 6, tzinfo=UTC))
    ]
    report = await collector.process_file(odd, sink)
    assert report.rejected == 1 and report.rejected_report is not None
    assert "does not match well_id_pattern" in report.rejected_report.read_text()


async def test_time_formats_and_time_zones(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    local = tmp_path / "in" / "local.csv"
    local.write_text(
        "Timestamp,Well,Hookload (klbs)\n01/07/2026 12:00:00,W,1\n01/01/2026 12:00:00,W,2\n"
    )
    sink = MemorySink()
    await watcher(tmp_path, timestamp_format="%d/%m/%Y %H:%M:%S",
                  timezone="Europe/London").process_file(local, sink)
    assert [r.timestamp for r in sink.readings] == [
        datetime(2026, 7, 1, 11, tzinfo=UTC), datetime(2026, 1, 1, 12, tzinfo=UTC)
    ]
    epoch = tmp_path / "in" / "epoch.csv"
    epoch.write_text("Timestamp;Well;Hookload (klbs)\n1767225600250;W;1,5\n")
    sink = MemorySink()
    await watcher(tmp_path, timestamp_format="unix_ms", delimiter=";",
                  decimal_separator=",").process_file(epoch, sink)
    [reading] = sink.readings
    assert reading.timestamp == datetime(2026, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC)
    assert reading.value == 1.5
    # An ISO time with an offset keeps it, whatever the configured zone.
    parser = TimestampParser("iso", "Europe/London")
    assert parser.parse("2026-07-01T12:00:00+02:00") == datetime(2026, 7, 1, 10, tzinfo=UTC)
    assert parser.parse("2026-07-01") == datetime(2026, 6, 30, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("count", "chunk_rows"),
    [
        (100_000, 500),
        # tracemalloc makes every allocation about ten times dearer: ~30 s for 1 M rows.
        pytest.param(1_000_000, 5_000, marks=pytest.mark.slow),
    ],
)
async def test_a_huge_file_streams_through_in_bounded_memory(
    tmp_path: Path, count: int, chunk_rows: int
) -> None:
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "huge.csv"
    with source.open("w") as out:
        out.write(HEADER)
        step = min(count, 100_000)
        for start in range(0, count, step):
            out.write(rows(step, start=start))
    size = source.stat().st_size
    # One mapped column (a reading per row) keeps the test short; the chunking is per row.
    collector = watcher(tmp_path, chunk_rows=chunk_rows, mapping=[
        {"csv_column": "Hookload (klbs)", "parameter": "hookload", "unit": "klbs"}
    ])
    sink = MemorySink(keep=False)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        report = await collector.process_file(source, sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = peak - before
    assert (report.rows, report.readings, sink.count) == (count, count, count)
    assert sink.emits == count // chunk_rows + 1  # full chunks, then the end of the file
    # A chunk of 5,000 rows is about a megabyte of readings; the 1 M-row file is 60 MB. The
    # megabyte allowed on top is fixed overhead, which does not grow with the file.
    assert growth < size / 10 + 1_000_000, f"peak growth {growth} bytes for a {size}-byte file"


async def test_a_crash_mid_file_resumes_without_emitting_a_row_twice(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "big.csv"
    body = rows(25)
    # Bad rows in the chunk that is emitted, in the one that is lost, and after it.
    lines = body.splitlines(keepends=True)
    lines[3] = "bad,WELL-001,1,1,ok\n"  # line 5, chunk 1
    lines[12] = "bad,WELL-001,1,1,ok\n"  # line 14, chunk 3 (lost in the crash)
    lines[21] = "bad,WELL-001,1,1,ok\n"  # line 23, chunk 5
    source.write_text(HEADER + "".join(lines))
    store = MemorySink()
    with pytest.raises(RuntimeError, match="died"):
        # Chunks of 5 rows: emits 1 and 2 are durable, the 3rd dies with the agent.
        await watcher(tmp_path, chunk_rows=5).process_file(source, CrashingSink(3, store))
    assert source.exists()
    assert len(store.readings) == 2 * 5 * 2 - 2  # ten rows, one bad
    report = await watcher(tmp_path, chunk_rows=5).process_file(source, store)
    assert report.resumed_at_row == 10
    good = set(range(25)) - {3, 12, 21}
    identities = store.identities()
    assert len(identities) == len(set(identities)), "a row was emitted twice"
    assert set(identities) == {
        ("WELL-001", parameter, T0 + timedelta(seconds=i))
        for i in good
        for parameter in ("wellhead_pressure", "hookload")
    }
    assert report.rejected_report is not None
    with report.rejected_report.open(newline="") as rejected:
        assert [row[0] for row in list(csv.reader(rejected))[1:]] == ["5", "14", "23"]
    assert report.rejected == 3 and not source.exists()


async def test_a_crash_between_the_last_chunk_and_the_move_archives_on_restart(
    tmp_path: Path,
) -> None:
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "day.csv"
    source.write_text(HEADER + rows(4))
    store = MemorySink()
    collector = watcher(tmp_path)
    # The only emit (the whole file, marked complete) is durable, then the agent dies.
    real_archive = collector._archive

    async def die(*args: Any) -> FileReport:
        raise RuntimeError("the agent died")

    collector._archive = die  # type: ignore[method-assign,assignment]
    with pytest.raises(RuntimeError):
        await collector.process_file(source, store)
    collector._archive = real_archive  # type: ignore[method-assign]
    assert source.exists() and len(store.readings) == 8
    report = await watcher(tmp_path).process_file(source, store)
    assert report.readings == 0 and len(store.readings) == 8
    assert report.archived == tmp_path / "archive" / "day.csv" and not source.exists()


async def test_a_name_taken_in_the_archive_gets_a_number(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "day.csv").write_text("an older file")
    source = tmp_path / "in" / "day.csv"
    source.write_text(HEADER + rows(1) + "bad,W,1,1,ok\n")
    report = await watcher(tmp_path).process_file(source, MemorySink())
    assert report.archived == tmp_path / "archive" / "day.1.csv"
    assert report.rejected_report == tmp_path / "archive" / "day.1.rejected.csv"
    assert (tmp_path / "archive" / "day.csv").read_text() == "an older file"


async def run_watcher(collector: FileWatcher, sink: MemorySink) -> asyncio.Task[None]:
    return asyncio.create_task(collector.run(sink))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_files_that_arrived_while_the_agent_was_down_are_read_at_start(
    tmp_path: Path,
) -> None:
    (tmp_path / "in").mkdir()
    for day in range(3):
        (tmp_path / "in" / f"day{day}.csv").write_text(
            HEADER + rows(5, start=day * 5)
        )
    sink = MemorySink()
    task = await run_watcher(watcher(tmp_path), sink)
    try:
        await poll(lambda: len(os.listdir(tmp_path / "archive")) == 3)
        # And one arriving while it runs.
        (tmp_path / "in" / "day3.csv").write_text(HEADER + rows(5, start=15))
        await poll(lambda: len(os.listdir(tmp_path / "archive")) == 4)
    finally:
        await stop(task)
    assert set(sink.identities()) == expected(20) and len(sink.readings) == 40
    assert os.listdir(tmp_path / "in") == []


async def test_half_written_and_temporary_files_wait_until_complete(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    sink = MemorySink()
    task = await run_watcher(watcher(tmp_path, settle_time="400ms"), sink)
    try:
        # A temporary name is never read, however long it stays.
        temporary = tmp_path / "in" / "later.csv.part"
        temporary.write_text(HEADER + rows(3, start=100, well="WELL-009"))
        # A file written slowly, a row at a time, faster than it settles.
        growing = tmp_path / "in" / "growing.csv"
        with growing.open("w") as out:
            out.write(HEADER)
            for i in range(20):
                out.write(rows(1, start=i))
                out.flush()
                await asyncio.sleep(0.05)
        await poll(lambda: not growing.exists())
        # Read once, complete: a premature read would have archived a partial file.
        assert set(sink.identities()) == expected(20) and len(sink.readings) == 40
        assert temporary.exists()
        temporary.rename(tmp_path / "in" / "later.csv")
        await poll(lambda: not (tmp_path / "in" / "later.csv").exists())
    finally:
        await stop(task)
    assert set(sink.identities()) == expected(20) | expected(3, start=100, well="WELL-009")


async def test_a_file_is_archived_only_after_its_points_are_durable(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "day.csv"
    source.write_text(HEADER + rows(3))
    sink = GatedSink()
    task = await run_watcher(watcher(tmp_path), sink)
    try:
        await asyncio.wait_for(sink.entered.wait(), timeout=15)
        # The buffer has not confirmed the points: the file stays where it is.
        await asyncio.sleep(0.3)
        assert source.exists() and os.listdir(tmp_path / "archive") == []
        sink.release.set()
        await poll(lambda: not source.exists())
    finally:
        await stop(task)
    assert (tmp_path / "archive" / "day.csv").exists() and len(sink.readings) == 6


async def test_a_missing_watch_directory_fails_for_the_agent_to_retry(tmp_path: Path) -> None:
    collector = watcher(tmp_path, watch_directory=str(tmp_path / "not-mounted"))
    with pytest.raises(CollectorError) as failed:
        await collector.run(MemorySink())
    assert failed.value.retryable and "does not exist" in str(failed.value)
    with pytest.raises(CollectorError):
        await collector.probe()


async def test_probe_says_what_is_waiting(tmp_path: Path) -> None:
    collector = watcher(tmp_path)
    (tmp_path / "in" / "a.csv").write_text(HEADER)
    (tmp_path / "in" / "b.csv.tmp").write_text(HEADER)
    found = await collector.probe()
    assert "1 file(s) waiting" in found and str(tmp_path / "in") in found


# --- configuration ---------------------------------------------------------------------------


def test_the_sample_config_loads(tmp_path: Path) -> None:
    # The documentation shows the sample as it is (Telegraf's sample.conf habit).
    doc = (ROOT / "docs" / "collectors" / "file_watcher.md").read_text()
    assert sample_text("file_watcher") in doc
    config = load_sample(tmp_path, "file_watcher", environ={})
    [watcher_config] = config.data_sources
    assert isinstance(watcher_config, FileWatcherConfig)
    assert watcher_config.settle_time == timedelta(seconds=2)
    registry = config.registry()
    for column in watcher_config.mapping:
        parameter = registry.get(column.parameter)
        assert parameter is not None and column.unit in parameter.conversions


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"well_id_pattern": "^(?P<well_id>.+)_"}, "exactly one of well_id_column"),
        ({"well_id_column": None}, "exactly one of well_id_column"),
        ({"well_id_column": None, "well_id_pattern": "^(.+)_"}, "named group (?P<well_id>"),
        ({"well_id_column": None, "well_id_pattern": "^(?P<well_id>"}, "not a regular"),
        ({"timestamp_format": "dd/mm/yyyy"}, "not a timestamp format"),
        ({"timezone": "Atlantis"}, "not a time zone"),
        ({"encoding": "klingon"}, "not a text encoding"),
        ({"decimal_separator": ","}, "needs another delimiter"),
        ({"archive_directory": "IN"}, "must not be the watch_directory"),
        ({"mapping": []}, "at least one column"),
        ({"chunk_rows": 0}, "greater than or equal to 1"),
        ({"poll": True}, "xtra"),
    ],
)
def test_bad_configuration_is_refused_at_load(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    if changes.get("archive_directory") == "IN":
        changes["archive_directory"] = str(tmp_path / "in")
    with pytest.raises(ValidationError) as refused:
        settings(tmp_path, **changes)
    assert message in " ".join(str(e["msg"]) for e in refused.value.errors())
