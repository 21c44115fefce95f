"""A throwaway PostgreSQL cluster for tests and benchmarks: :func:`throwaway_cluster`.

Starts the distribution's PostgreSQL server binaries (Debian's
``/usr/lib/postgresql/<version>/bin``) on a new data folder in a temporary
folder, reachable only over a unix socket in that folder (no TCP), and
removes it all when done. The server refuses to run as root, so as root
the folder is given to the ``postgres`` user and the binaries run as it
(``runuser``). Durability is off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the data is thrown away anyway. Benchmarks that
measure the cost of a commit pass ``durable=True``.

    with throwaway_cluster() as cluster:
        dsn = cluster.create_database("relay")   # postgresql:///relay?host=...

``hushchat bench relay --db postgres`` starts one (durable, so that a commit
waits for its WAL flush as SQLite's ``synchronous=FULL`` does) and measures
its CPU time (:meth:`ThrowawayCluster.cpu_seconds`, read from ``/proc``: the
postmaster's user and system time, that of its children that ended, which
the kernel adds to it when it reaps them, and that of its live children,
the backends serving the relays, the WAL writer, the checkpointer; so a
backend ending mid-run is neither lost nor counted twice). By hand, as root::

    dir=$(mktemp -d) && chown postgres: "$dir"
    bin=/usr/lib/postgresql/15/bin
    runuser -u postgres -- $bin/initdb -D "$dir/data" -U postgres -A trust
    runuser -u postgres -- $bin/pg_ctl -D "$dir/data" -l "$dir/log" -w \\
        -o "-c listen_addresses='' -c unix_socket_directories='$dir'" start
    hushchat bench relay --db "postgresql:///postgres?host=$dir&user=postgres"
    runuser -u postgres -- $bin/pg_ctl -D "$dir/data" -m fast stop && rm -r "$dir"
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

# Where Debian's postgresql packages put the server binaries (one folder per version).
SERVER_BINARIES = "/usr/lib/postgresql/*/bin"

# The user the server runs as when the caller is root (Debian's).
SERVER_USER = "postgres"

# Connections the server accepts: several relay processes of a test, each with
# a writer and a listener connection, and the test's own.
MAX_CONNECTIONS = 100

# Seconds pg_ctl waits for the server to start or stop.
START_TIMEOUT = 60


class ClusterError(RuntimeError):
    """The cluster cannot be started where asked: the message says why."""


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server binaries' folder, or None."""
    found = [Path(p) for p in glob.glob(SERVER_BINARIES) if (Path(p) / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])


@dataclass
class ThrowawayCluster:
    """A running throwaway server: its folder, and databases created on it."""

    folder: Path
    binaries: Path
    as_user: str | None  # the user the binaries run as, None: the caller

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def dsn(self, database: str = "postgres") -> str:
        """The URL of ``database``, over the cluster's unix socket, as its superuser."""
        return f"postgresql:///{database}?host={self.folder}&user={SERVER_USER}"

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create ``name`` (a copy of ``template`` if given: fast); its URL."""
        # FILE_COPY: copies the template's files at once instead of logging every
        # page (PostgreSQL 15's default), several times faster for a small database.
        copy = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        self.sql(f'CREATE DATABASE "{name}"{copy}')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sql(self, statement: str) -> None:
        """Run one statement on the ``postgres`` database (autocommit)."""
        import psycopg  # the optional extra: only who starts a cluster needs it

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(statement.encode())

    def _run(self, *args: str) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.as_user is not None:
            command = ["runuser", "-u", self.as_user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT * 2)

    def start(self, *, durable: bool = False) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SERVER_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = [
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.folder}'",
            f"-c max_connections={MAX_CONNECTIONS}",
        ]
        if not durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-o",
            " ".join(options),
            "-t",
            str(START_TIMEOUT),
            "-w",
            "start",
        )

    def stop(self) -> None:
        with suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    @property
    def postmaster_pid(self) -> int:
        try:
            with open(self.data / "postmaster.pid") as pid_file:
                return int(pid_file.readline())
        except (OSError, ValueError):
            raise ClusterError("the cluster is not running") from None

    def cpu_seconds(self) -> float:
        """The CPU seconds the server's processes used so far."""
        return process_tree_cpu_seconds(self.postmaster_pid)


@contextmanager
def throwaway_cluster(
    *, durable: bool = False, parent: str | None = None
) -> Iterator[ThrowawayCluster]:
    """Start a throwaway PostgreSQL server for the block; stop and delete it after.

    Its folder is made in ``parent`` (default: the system's temporary folder).
    RuntimeError if the server binaries are missing (:func:`server_binaries`),
    ClusterError if the server's user cannot reach ``parent``.
    """
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError(f"no PostgreSQL server binaries in {SERVER_BINARIES}")
    as_user = None
    if os.geteuid() == 0:  # the server refuses root: the folder becomes its user's
        as_user = SERVER_USER
        entry = pwd.getpwnam(SERVER_USER)
        where = os.path.abspath(parent or tempfile.gettempdir())
        if not _reachable(where, entry.pw_uid):
            raise ClusterError(
                f"the {SERVER_USER} user cannot reach {where}: give a folder it can reach, "
                "such as /tmp"
            )
    folder = Path(tempfile.mkdtemp(prefix="hushchat-pg-", dir=parent))  # 0700
    if as_user is not None:
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    cluster = ThrowawayCluster(folder, binaries, as_user)
    try:
        cluster.start(durable=durable)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _reachable(path: str, uid: int) -> bool:
    """Whether user ``uid`` may pass through every folder down to ``path`` (by its owner's
    or everyone's search permission: the server's user shares no group with ours)."""
    while True:
        mode = os.stat(path)
        if not mode.st_mode & stat.S_IXOTH and not (
            mode.st_uid == uid and mode.st_mode & stat.S_IXUSR
        ):
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (its field 3 on), or None if it ended."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            text = stat_file.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                children.append(int(entry))
    return children


def process_tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of ``root``, its reaped children and its live
    descendants: continuous while children come and go."""
    fields = _stat_fields(root)
    if fields is None:
        raise ClusterError(f"process {root} is gone")
    # stat's fields 14 to 17 (utime, stime, cutime, cstime) are 11 to 14 from field 3.
    ticks = sum(int(f) for f in fields[11:15])
    pending = _children(root)
    while pending:
        pid = pending.pop()
        child = _stat_fields(pid)
        if child is not None:
            ticks += int(child[11]) + int(child[12])
            pending.extend(_children(pid))
    return ticks / os.sysconf("SC_CLK_TCK")
