"""CSV ingest rate of the edge agent: a 1 M-row file through ``file_watcher`` → transform →
buffer (real SQLite), beside the ceiling of Python's csv module reading the same file.

    .venv/bin/python bench/csv_ingest.py [--rows 1000000] [--runs 1] [--chunk-rows 5000]
                                         [--no-freeze]

The file has a timestamp (ISO 8601 with offset), a well id, three numeric columns and a text
column, like a rig's export. Each run measures, on the same file:

* **csv module** (ceiling): ``csv.reader`` over the file, counting rows, no other work. No
  collector reading CSV in Python can go faster.
* **parse only**: ``FileWatcher.process_file`` into a sink that only counts: the collector's own
  cost (rows, timestamps, numbers, readings, chunking, progress).
* **transform → buffer only**: the first chunk's readings (3 columns), parsed once and emitted
  again and again into the same ``SourceSink`` and buffer as below: what the rest of the agent
  costs per row, the ceiling of the 3-column path if reading the file cost nothing.
* **3 columns → buffer**: the whole agent path for the three mapped columns (3 points a row):
  ``FileWatcher`` → ``SourceSink`` (``Transform``: unit conversion and range check into
  points) → ``Buffer`` (sealed, compressed 1,000-point batches committed to SQLite in
  WAL mode, the file's progress committed with them); the clock stops when the file has been
  archived, i.e. when every point is durable in the buffer.
* **1 column → buffer**: the same with one mapped column (1 point a row).

Before the runs, the objects made so far are frozen out of the cyclic garbage collector's sight,
as ``welltegra-agent run`` does once the agent has started (``--no-freeze`` leaves them: a third
slower). Rows/s is rows over wall time. After each run the buffer's pending points are counted:
every row must be there once per mapped column, or the benchmark fails. The target is
``rows_per_s >= 50000`` for the 3-column file (the figure the JSON line calls ``rows_per_s``).

Progress goes to stderr. Stdout is a table, then exactly one line of JSON, the last line:
``{"rows_per_s": …, "points_per_s": …, "ceiling_rows_per_s": …, …}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge.agent import SourceSink, freeze_long_lived
from edge.buffer import Buffer
from edge.collectors.file_watcher import FileWatcher, FileWatcherConfig
from edge.metrics import AgentMetrics
from edge.readings import Reading
from edge.transform import Transform
from ingest_service.parameters import ParameterRegistry

TENANT = "bench_csv"
TARGET_ROWS_PER_S = 50_000
HEADER = ["Timestamp", "Well", "Wellhead Pressure (psi)", "Hookload (klbs)",
          "Flow Rate (bbl/day)", "Comment"]
MAPPING = [
    {"csv_column": "Wellhead Pressure (psi)", "parameter": "wellhead_pressure", "unit": "psi"},
    {"csv_column": "Hookload (klbs)", "parameter": "hookload", "unit": "klbs"},
    {"csv_column": "Flow Rate (bbl/day)", "parameter": "flow_rate", "unit": "bbl/day"},
]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_file(path: Path, rows: int) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    wells = [f"WELL-{n:03d}" for n in range(1, 9)]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(HEADER)
        step = timedelta(milliseconds=250)
        for i in range(rows):
            writer.writerow([
                (start + i // len(wells) * step).isoformat(), wells[i % len(wells)],
                f"{2000 + (i * 7) % 1500}.25", f"{200 + (i * 3) % 300}.5",
                f"{1000 + (i * 11) % 4000}", "drilling ahead",
            ])


class CountingSink:
    """A sink that only counts: the collector's cost alone."""

    def __init__(self) -> None:
        self.readings = 0
        self.marks: dict[str, str] = {}

    async def emit(
        self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
    ) -> None:
        self.readings += len(readings)
        self.marks.update(watermarks or {})

    async def watermark(self, key: str) -> str | None:
        return self.marks.get(key)

    def reject(self, reason: str, count: int = 1) -> None:
        raise AssertionError(f"{count} records rejected ({reason})")


def watcher(work: Path, columns: int, chunk_rows: int) -> FileWatcher:
    config = FileWatcherConfig(
        name="csv",
        watch_directory=work / "in",
        archive_directory=work / "archive",
        well_id_column="Well",
        timestamp_column="Timestamp",
        chunk_rows=chunk_rows,
        mapping=MAPPING[:columns],  # type: ignore[arg-type]  # validated into CsvColumn
    )
    return FileWatcher(config)


def fresh_copy(work: Path, master: Path) -> Path:
    """A new copy of the file to read, and no archive or buffer of an earlier run."""
    for leftover in (work / "archive", work / "in"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in work.glob("buffer.db*"):
        leftover.unlink()
    (work / "in").mkdir()
    path = work / "in" / "export.csv"
    shutil.copyfile(master, path)
    return path


def ceiling(path: Path) -> float:
    started = time.perf_counter()
    with path.open(newline="") as source:
        rows = sum(1 for _ in csv.reader(source)) - 1
    return rows / (time.perf_counter() - started)


async def through(work: Path, master: Path, rows: int, columns: int | None,
                  chunk_rows: int, registry: ParameterRegistry) -> float:
    """Rows/s of one file through the collector, into the buffer (or, with ``columns`` None,
    three columns into a counting sink)."""
    path = fresh_copy(work, master)
    collector = watcher(work, columns or 3, chunk_rows)
    if columns is None:
        counting = CountingSink()
        started = time.perf_counter()
        report = await collector.process_file(path, counting)
        elapsed = time.perf_counter() - started
        if counting.readings != rows * 3:
            raise SystemExit(f"parse only: {counting.readings} readings, not {rows * 3}")
        return report.rows / elapsed
    database = work / "buffer.db"
    buffer = await Buffer.open(database, tenant_id=TENANT)
    try:
        sink = SourceSink("csv", Transform(registry, "csv"), buffer,
                          AgentMetrics(TENANT))
        started = time.perf_counter()
        report = await collector.process_file(path, sink)
        elapsed = time.perf_counter() - started
        stats = await buffer.stats()
    finally:
        await buffer.close()
    if report.rows != rows or stats.pending_points != rows * columns:
        raise SystemExit(
            f"{columns} columns: {report.rows} rows read, {stats.pending_points} points "
            f"buffered; expected {rows} and {rows * columns}"
        )
    return report.rows / elapsed


async def buffer_ceiling(work: Path, master: Path, rows: int, chunk_rows: int,
                         registry: ParameterRegistry) -> float:
    """Rows/s of transform → buffer alone, 3 columns: the first chunk of the file, parsed
    once, emitted again and again (``rows`` rows in all), as if reading cost nothing."""
    path = fresh_copy(work, master)
    first = CountingSink()
    kept: list[Reading] = []

    class FirstChunk(CountingSink):
        async def emit(
            self, readings: Sequence[Reading], watermarks: Mapping[str, str] | None = None
        ) -> None:
            if not kept:
                kept.extend(readings)
            await first.emit(readings, watermarks)

    await watcher(work, 3, chunk_rows).process_file(path, FirstChunk())
    buffer = await Buffer.open(work / "buffer.db", tenant_id=TENANT)
    try:
        sink = SourceSink("csv", Transform(registry, "csv"), buffer,
                          AgentMetrics(TENANT))
        started = time.perf_counter()
        for n in range(rows // chunk_rows):
            await sink.emit(kept, {"file": str(n)})
        elapsed = time.perf_counter() - started
        stats = await buffer.stats()
    finally:
        await buffer.close()
    if stats.pending_points != rows // chunk_rows * len(kept):
        raise SystemExit(f"buffer ceiling: {stats.pending_points} points buffered")
    return rows // chunk_rows * chunk_rows / elapsed


async def main(args: argparse.Namespace) -> dict[str, object]:
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="welltegra-csv-bench-"))
    try:
        master = work / "master.csv"
        progress(f"writing {args.rows:,} rows to {master}")
        write_file(master, args.rows)
        size = master.stat().st_size
        progress(f"{size / 1e6:.1f} MB")
        registry = ParameterRegistry()
        if not args.no_freeze:
            freeze_long_lived()  # as ``welltegra-agent run`` does once the agent has started
        results: dict[str, list[float]] = {
            "ceiling": [], "parse": [], "buffer": [], "three": [], "one": []
        }
        for run in range(1, args.runs + 1):
            results["ceiling"].append(ceiling(master))
            results["parse"].append(
                await through(work, master, args.rows, None, args.chunk_rows, registry)
            )
            results["buffer"].append(
                await buffer_ceiling(work, master, args.rows, args.chunk_rows, registry)
            )
            results["three"].append(
                await through(work, master, args.rows, 3, args.chunk_rows, registry)
            )
            results["one"].append(
                await through(work, master, args.rows, 1, args.chunk_rows, registry)
            )
            progress(
                f"run {run}: csv module {results['ceiling'][-1]:,.0f}, parse only "
                f"{results['parse'][-1]:,.0f}, transform → buffer only "
                f"{results['buffer'][-1]:,.0f}, 3 columns {results['three'][-1]:,.0f}, "
                f"1 column {results['one'][-1]:,.0f} rows/s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"{'path':<36} {'rows/s':>12} {'points/s':>12} {'of ceiling':>11}")
    lines = [
        ("csv module (ceiling)", median["ceiling"], 0),
        ("file_watcher, parse only", median["parse"], 3),
        ("transform → buffer only, 3 columns", median["buffer"], 3),
        ("file_watcher → buffer, 3 columns", median["three"], 3),
        ("file_watcher → buffer, 1 column", median["one"], 1),
    ]
    for name, rate, per_row in lines:
        points = f"{rate * per_row:,.0f}" if per_row else "-"
        print(f"{name:<36} {rate:>12,.0f} {points:>12} {rate / median['ceiling']:>11.3f}")
    return {
        "rows_per_s": round(median["three"]),
        "points_per_s": round(median["three"] * 3),
        "one_column_rows_per_s": round(median["one"]),
        "parse_only_rows_per_s": round(median["parse"]),
        "transform_buffer_only_rows_per_s": round(median["buffer"]),
        "ceiling_rows_per_s": round(median["ceiling"]),
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "rows": args.rows,
        "file_mb": round(size / 1e6, 1),
        "chunk_rows": args.chunk_rows,
        "runs": args.runs,
        "gc_frozen": not args.no_freeze,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--chunk-rows", type=int, default=5_000)
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the objects made at start to the cyclic garbage collector "
                        "(the agent freezes them: edge.agent.freeze_long_lived)")
    figures = asyncio.run(main(parser.parse_args()))
    print(json.dumps(figures))
