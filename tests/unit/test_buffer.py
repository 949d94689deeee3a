"""The write-ahead buffer on real SQLite files: sealing, watermarks, lanes, acknowledgement, the
size cap and retention with their loss records, the block policy, dead letters, damage, and
``kill -9`` at random moments."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from edge.buffer import Buffer
from edge.readings import Point
from welltegra.ingest.v1 import ingest_pb2

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def points(n: int, start: int = 0, well: str = "W-1", parameter: str = "hookload") -> list[
    Point
]:
    return [
        Point(well, parameter, T0 + i, 0, float(i % 500), "klbs", "GOOD", "sim:W-1.hookload")
        for i in range(start, start + n)
    ]


def incompressible(batch: list[Point]) -> list[Point]:
    """``batch`` with random values: each 1,000 points cost about 9 KB."""
    return [p._replace(value=int.from_bytes(os.urandom(6), "big") / 7.0) for p in batch]


def decode(payload: bytes) -> ingest_pb2.IngestRequest:
    return ingest_pb2.IngestRequest.FromString(payload)


async def open_buffer(path: Path, **options: object) -> Buffer:
    defaults: dict[str, object] = {"tenant_id": "acme", "linger": 0.05}
    defaults.update(options)
    return await Buffer.open(path, **defaults)  # type: ignore[arg-type]


async def test_batches_seal_by_size_and_by_linger(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "b.db", batch_max_points=100, linger=0.05)
    try:
        await buffer.append("sim", points(250))
        pending = await buffer.pending(limit=10)
        assert [b.point_count for b in pending] == [100, 100, 50]
        assert [b.sequence for b in pending] == [1, 2, 3]
        request = decode(pending[0].payload)
        assert request.tenant_id == "acme"
        assert request.agent_id == buffer.agent_id
        assert request.batch_sequence == 1
        assert [p.timestamp.seconds - T0 for p in request.data_points] == list(range(100))
        assert pending[2].first_ts == T0 + 200 and pending[2].last_ts == T0 + 249
    finally:
        await buffer.close()


async def test_concurrent_appends_share_one_batch(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "b.db", linger=0.1)
    try:
        await asyncio.gather(*(buffer.append(f"s{i}", points(10, 10 * i)) for i in range(5)))
        pending = await buffer.pending(limit=10)
        assert len(pending) == 1 and pending[0].point_count == 50
    finally:
        await buffer.close()


async def test_a_bulk_append_tops_up_the_open_batch_and_seals_all_at_once(
    tmp_path: Path,
) -> None:
    # A long linger: only the bulk append can seal the small append's batch in time.
    buffer = await open_buffer(tmp_path / "b.db", batch_max_points=100, linger=60)
    counted: Counter[str] = Counter()
    buffer.on_sealed = counted.update
    try:
        small = asyncio.create_task(buffer.append("opc", points(30, well="W-2"), {"sub": "7"}))
        await asyncio.sleep(0.05)
        assert not small.done()  # waiting in the open batch
        await buffer.append("csv", points(250), {"file": "a.csv:250"})
        await asyncio.wait_for(small, timeout=5)
        pending = await buffer.pending(limit=10)
        assert [b.point_count for b in pending] == [100, 100, 80]
        assert [b.sequence for b in pending] == [1, 2, 3]
        first = decode(pending[0].payload)
        assert [p.well_id for p in first.data_points] == ["W-2"] * 30 + ["W-1"] * 70
        last = decode(pending[2].payload)
        assert [p.timestamp.seconds - T0 for p in last.data_points] == list(range(170, 250))
        assert counted == {"opc": 30, "csv": 250}
        assert await buffer.watermark("csv", "file") == "a.csv:250"
        assert await buffer.watermark("opc", "sub") == "7"
    finally:
        await buffer.close()


async def test_watermark_is_committed_with_its_points(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buffer = await open_buffer(path)
    await buffer.append("sim", points(5), {"tick": "42"})
    assert await buffer.watermark("sim", "tick") == "42"
    assert await buffer.watermark("other", "tick") is None
    agent_id = buffer.agent_id
    await buffer.close()

    reopened = await open_buffer(path)
    try:
        assert reopened.agent_id == agent_id
        assert await reopened.watermark("sim", "tick") == "42"
        await reopened.append("sim", points(1, 5))
        assert [b.sequence for b in await reopened.pending(limit=10)] == [1, 2]
    finally:
        await reopened.close()


async def test_a_new_database_is_a_new_agent(tmp_path: Path) -> None:
    first = await open_buffer(tmp_path / "a.db")
    second = await open_buffer(tmp_path / "b.db")
    try:
        assert first.agent_id != second.agent_id
    finally:
        await first.close()
        await second.close()


async def test_acknowledged_batches_leave_and_lanes_split_by_seal_time(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "b.db", batch_max_points=10)
    try:
        await buffer.append("sim", points(30))
        middle = time.time()
        await asyncio.sleep(0.01)
        await buffer.append("sim", points(10, 30))
        assert [b.sequence for b in await buffer.pending(limit=10, sealed_before=middle)] == [
            1,
            2,
            3,
        ]
        assert [b.sequence for b in await buffer.pending(limit=10, sealed_after=middle)] == [4]
        buffer.in_flight.add(1)
        assert [b.sequence for b in await buffer.pending(limit=2)] == [2, 3]
        buffer.in_flight.clear()
        await buffer.acknowledge([1, 2])
        stats = await buffer.stats()
        assert (stats.pending_batches, stats.pending_points) == (2, 20)
    finally:
        await buffer.close()


def gaps_of(batches: list[object]) -> list[ingest_pb2.DataGap]:
    found = []
    for batch in batches:
        found.extend(decode(batch.payload).data_gaps)  # type: ignore[attr-defined]
    return found


async def test_size_cap_drops_the_oldest_and_records_exactly_what_was_lost(
    tmp_path: Path,
) -> None:
    cap = 400 * 1024
    buffer = await open_buffer(
        tmp_path / "b.db", batch_max_points=1000, max_size_gb=cap / 1024**3
    )
    try:
        sent = 0
        for _ in range(60):
            await buffer.append("sim", incompressible(points(1000, sent)))
            sent += 1000
        stats = await buffer.stats()
        assert stats.used_bytes <= cap
        assert buffer.dropped["size_cap"] > 0
        pending = await buffer.pending(limit=1000)
        kept = {
            p.timestamp.seconds
            for b in pending
            for p in decode(b.payload).data_points
        }
        lost = sorted(set(range(T0, T0 + sent)) - kept)
        # The oldest went first: what is lost is one contiguous run from the start.
        assert lost == list(range(T0, T0 + len(lost)))
        assert len(lost) == buffer.dropped["size_cap"]
        gaps = gaps_of(pending)
        assert {g.reason for g in gaps} == {"size_cap"}
        assert sum(g.point_count for g in gaps) == len(lost)
        assert min(g.first_timestamp.seconds for g in gaps) == lost[0]
        assert max(g.last_timestamp.seconds for g in gaps) == lost[-1]
        assert {(g.well_id, g.parameter_name, g.source) for g in gaps} == {
            ("W-1", "hookload", "sim")
        }
    finally:
        await buffer.close()


async def test_retention_drops_old_batches_with_loss_records(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buffer = await open_buffer(path, retention_days=1)
    await buffer.append("sim", points(20))
    await buffer.append("sim", points(5, 20, well="W-2"))
    await buffer.close()
    with sqlite3.connect(path) as conn:  # two days pass
        conn.execute("UPDATE batches SET sealed_at = sealed_at - 2 * 86400")
    buffer = await open_buffer(path, retention_days=1)
    try:
        assert buffer.dropped["retention"] == 25
        pending = await buffer.pending(limit=10)
        assert all(b.point_count == 0 for b in pending)
        gaps = {(g.well_id, g.point_count, g.reason) for g in gaps_of(pending)}
        assert gaps == {("W-1", 20, "retention"), ("W-2", 5, "retention")}
    finally:
        await buffer.close()


async def test_block_policy_holds_collection_until_uploads_free_space(tmp_path: Path) -> None:
    cap = 200 * 1024
    buffer = await open_buffer(
        tmp_path / "b.db", full_policy="block", max_size_gb=cap / 1024**3, linger=0.01
    )
    try:
        written = 0
        while (await buffer.stats()).used_bytes <= cap:
            await buffer.append("sim", incompressible(points(1000, written)))
            written += 1000
        blocked = asyncio.create_task(buffer.append("sim", points(10, written)))
        await asyncio.sleep(0.5)
        assert not blocked.done()
        pending = await buffer.pending(limit=1000)
        await buffer.acknowledge([b.sequence for b in pending])
        await asyncio.wait_for(blocked, timeout=10)
        assert buffer.dropped["size_cap"] == 0
    finally:
        await buffer.close()


async def test_dead_letter_keeps_the_batch_and_records_the_gap(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "b.db")
    try:
        await buffer.append("sim", points(7))
        [batch] = await buffer.pending(limit=10)
        assert await buffer.dead_letter(batch.sequence, "validation_error: bad") == 7
        stats = await buffer.stats()
        assert (stats.dead_letter_batches, stats.dead_letter_points) == (1, 7)
        [gap] = gaps_of(await buffer.pending(limit=10))
        assert (gap.reason, gap.point_count) == ("dead_letter", 7)
    finally:
        await buffer.close()


async def test_check_sets_damaged_batches_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buffer = await open_buffer(path, batch_max_points=10)
    await buffer.append("sim", points(30))
    await buffer.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE batches SET payload = ? WHERE sequence = 2", (b"not zlib",))
        # Valid zlib around bytes that are not a protobuf message.
        conn.execute(
            "UPDATE batches SET payload = ? WHERE sequence = 3", (zlib.compress(b"\xff\xff"),)
        )
    buffer = await open_buffer(path, batch_max_points=10)
    try:
        report = await buffer.check()
        assert report.integrity == "ok"
        assert report.quarantined == [2, 3]
        assert [b.sequence for b in await buffer.pending(limit=10) if b.point_count] == [1]
        lines = [line async for line in buffer.export()]
        assert '"batch_sequence":"1"' in lines[0]
    finally:
        await buffer.close()


async def test_an_unreadable_file_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not an sqlite database" * 100)
    buffer = await open_buffer(path)
    try:
        await buffer.append("sim", points(3))
        assert (await buffer.stats()).pending_points == 3
    finally:
        await buffer.close()
    assert [name.startswith("b.db.damaged-") for name in os.listdir(tmp_path)].count(True) == 1


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edge.buffer import Buffer
    from tests.unit.test_buffer import points

    async def main():
        buffer = await Buffer.open(Path(sys.argv[1]), tenant_id="acme", linger=0.02)
        start = int(await buffer.watermark("sim", "next") or 0)
        while True:
            await buffer.append("sim", points(137, start), {"next": str(start + 137)})
            start += 137
            print(start, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_kill_9_never_loses_what_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    acknowledged = 0
    for round_ in range(4):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, str(path),
            stdout=subprocess.PIPE, cwd=Path(__file__).parents[2],
        )
        assert process.stdout is not None
        deadline = time.monotonic() + 0.5 + 0.3 * round_
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
            acknowledged = max(acknowledged, int(line))
        process.send_signal(signal.SIGKILL)
        await process.wait()
    buffer = await open_buffer(path)
    try:
        report = await buffer.check()
        assert report.integrity == "ok" and not report.quarantined
        stored = [
            p.timestamp.seconds - T0
            for b in await buffer.pending(limit=100_000)
            for p in decode(b.payload).data_points
        ]
        # Everything acknowledged is there, exactly once, and nothing beyond the watermark.
        resume = int(await buffer.watermark("sim", "next") or 0)
        assert resume >= acknowledged
        assert sorted(stored) == list(range(resume))
    finally:
        await buffer.close()
