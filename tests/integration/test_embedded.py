"""Embedded PostgreSQL and Redis: start, attach from another process, stop, restart, failures.

Real servers from the pip wheels, each test in its own data directory; the whole file takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from ingest_service.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServerError,
    EmbeddedStack,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The admin process: attaches to the servers of the data directory (argv[1]), writes through
# both, stops its handles and reports what it saw.
ADMIN_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
import asyncpg, redis.asyncio as aioredis
from ingest_service.embedded import EmbeddedStack

stack = EmbeddedStack(Path(sys.argv[1]))
db_url, redis_url = stack.start()

async def write():
    conn = await asyncpg.connect(db_url)
    await conn.execute("INSERT INTO wells (name) VALUES ('from admin')")
    await conn.close()
    client = aioredis.from_url(redis_url)
    await client.set("admin", "was here")
    await client.aclose()

asyncio.run(write())
owns = [stack.postgres.owns_server, stack.redis.owns_server]
stack.stop()
print(json.dumps({"db_url": db_url, "redis_url": redis_url, "owns": owns}))
"""

# An owner that dies without stopping its server (as after kill -9): os._exit skips atexit.
ORPHAN_SCRIPT = """
import os, sys
from pathlib import Path
from ingest_service.embedded import EmbeddedRedis

handle = EmbeddedRedis(Path(sys.argv[1]))
handle.start()
print(handle.pid, flush=True)
os._exit(0)
"""


# Started several times at once on one fresh data directory: reports, then waits for stdin EOF.
RACE_SCRIPT = """
import json, sys
from pathlib import Path
from ingest_service.embedded import EmbeddedPostgres

handle = EmbeddedPostgres(Path(sys.argv[1]))
url = handle.start()
print(json.dumps({"url": url, "pid": handle.pid, "owns": handle.owns_server}), flush=True)
sys.stdin.read()
handle.stop()
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh data directory outside pytest's basetemp.

    As root, postgres runs as another account that must traverse the data directory's
    ancestors; every pytest run resets /tmp/pytest-of-root to 0700 (and prunes old runs), so a
    concurrent pytest on the same machine would pull tmp_path from under a running initdb.
    """
    path = Path(tempfile.mkdtemp(prefix="welltegra-embedded-test-"))
    yield path
    # Safety net for a failed test: no server may outlive its data directory.
    for pid_file in path.rglob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if Path(f"/proc/{pid}/exe").resolve().name in ("postgres", "redis-server"):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def python_env() -> dict[str, str]:
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


async def run_python(script: str, *args: str) -> str:
    """Run script in a fresh interpreter (another process, like an admin command); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args,
        env=python_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our child, killed) has exited too.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        await asyncio.sleep(0.02)


async def count_wells(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM wells")
        return count
    finally:
        await conn.close()


async def test_start_attach_stop_restart(data_dir: Path) -> None:
    stack = EmbeddedStack(data_dir)
    try:
        db_url, redis_url = stack.start()
        assert stack.start() == (db_url, redis_url)  # idempotent
        assert stack.postgres.owns_server and stack.redis.owns_server
        assert db_url.startswith("postgresql://postgres@/postgres?host=/")
        assert redis_url == f"unix://{data_dir}/redis/redis.sock"
        pg_pid, redis_pid = stack.postgres.pid, stack.redis.pid
        assert pg_pid is not None and redis_pid is not None

        conn = await asyncpg.connect(db_url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("CREATE TABLE wells (id serial PRIMARY KEY, name text NOT NULL)")
        await conn.execute("INSERT INTO wells (name) VALUES ('Brent A-12')")
        await conn.close()
        client = aioredis.from_url(redis_url)
        await client.set("latest", "42.5")
        assert await client.get("latest") == b"42.5"

        # Another process attaches, uses both servers, and stops its handles ...
        report = json.loads(await run_python(ADMIN_SCRIPT, str(data_dir)))
        assert report == {"db_url": db_url, "redis_url": redis_url, "owns": [False, False]}
        # ... which leaves them running: same processes, the admin's writes visible.
        assert pid_alive(pg_pid) and pid_alive(redis_pid)
        assert await count_wells(db_url) == 2
        assert await client.get("admin") == b"was here"
        await client.aclose()

        # A second handle in this process attaches too and its stop() changes nothing.
        with EmbeddedPostgres(data_dir) as attached:
            assert attached.url == db_url and not attached.owns_server
        assert await count_wells(db_url) == 2
    finally:
        stack.stop()
    stack.stop()  # idempotent
    assert stack.postgres.url is None and stack.redis.url is None

    # The owner's stop() shut both down.
    await wait_dead(pg_pid)
    await wait_dead(redis_pid)
    assert not (data_dir / "redis" / "redis.sock").exists()
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(db_url, timeout=2)

    # A restart on the same data directory keeps the database (the cache is not persisted).
    with EmbeddedStack(data_dir) as again:
        assert again.postgres.owns_server and again.redis.owns_server
        assert again.postgres.url == db_url
        assert await count_wells(db_url) == 2
        client = aioredis.from_url(redis_url)
        assert await client.get("latest") is None
        await client.aclose()


async def test_concurrent_starts_share_one_server(data_dir: Path) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RACE_SCRIPT,
            str(data_dir),
            env=python_env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    try:
        reports = []
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
            reports.append(json.loads(line))
        # One initdb, one server: exactly one process launched it, the others attached.
        assert len({(r["url"], r["pid"]) for r in reports}) == 1
        assert sorted(r["owns"] for r in reports) == [False, False, True]
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), timeout=60)
    await wait_dead(reports[0]["pid"])


async def test_orphaned_server_is_adopted(data_dir: Path) -> None:
    orphan_pid = int(await run_python(ORPHAN_SCRIPT, str(data_dir)))
    assert pid_alive(orphan_pid)  # its owner is gone, the server is not
    handle = EmbeddedRedis(data_dir)
    try:
        handle.start()
        assert handle.pid == orphan_pid and handle.owns_server  # adopted, not started anew
    finally:
        handle.stop()
    await wait_dead(orphan_pid)


async def test_restart_after_kill_9(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir)
    second = EmbeddedPostgres(data_dir)
    try:
        db_url = first.start()
        conn = await asyncpg.connect(db_url)
        await conn.execute("CREATE TABLE wells (id serial PRIMARY KEY, name text NOT NULL)")
        await conn.execute("INSERT INTO wells (name) VALUES ('survivor')")
        await conn.close()
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)  # leaves postmaster.pid (and an unreaped zombie)
        await wait_dead(first.pid)

        assert second.start() == db_url  # crash recovery, not a refusal
        assert second.owns_server and second.pid != first.pid
        first.stop()  # the stale handle must not touch the new server
        assert await count_wells(db_url) == 1
    finally:
        first.stop()
        second.stop()


async def test_deep_data_dir_moves_sockets_to_tmp(data_dir: Path) -> None:
    deep = data_dir / ("deep-" + "x" * 60) / ("deeper-" + "y" * 60)
    with EmbeddedStack(deep) as stack:
        db_url, redis_url = stack.start()
        assert "host=/tmp/welltegra-" in db_url
        assert redis_url.startswith("unix:///tmp/welltegra-")
        conn = await asyncpg.connect(db_url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        client = aioredis.from_url(redis_url)
        assert await client.ping()
        await client.aclose()
    socket_dirs = [
        Path(parse_qs(urlsplit(db_url).query)["host"][0]),
        Path(urlsplit(redis_url).path).parent,
    ]
    assert not any(d.exists() for d in socket_dirs)  # cleaned up with the servers


async def test_failed_start_raises_with_log_tail(data_dir: Path) -> None:
    handle = EmbeddedPostgres(data_dir, start_timeout=20)
    handle.stop()  # before any start: a no-op
    handle.start()
    handle.stop()
    conf = handle.pgdata / "postgresql.conf"
    conf.write_text(conf.read_text() + "\nshared_buffers = 'plenty'\n")

    with pytest.raises(EmbeddedServerError) as info:
        handle.start()
    message = str(info.value)
    assert "\n" not in message
    assert "exited with code" in message
    assert "shared_buffers" in message  # the log tail names the culprit
    assert str(handle.log_path) in message
    assert handle.url is None and not handle.owns_server
    handle.stop()  # safe after a failed start
