"""A throwaway PostgreSQL cluster for the relay benchmark, and its CPU time.

``hushchat bench relay --db postgres`` starts one with :class:`ThrowawayCluster`
in a temporary directory, loads relays on it, and stops and deletes it at
the end. By hand, the same steps are::

    dir=$(mktemp -d) && chown postgres: "$dir"           # as root: the server refuses root
    runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D "$dir/data" -U postgres -A trust
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$dir/data" -l "$dir/log" -w \\
        -o "-k $dir -c listen_addresses=''" start
    hushchat bench relay --db "postgresql://postgres@/postgres?host=$dir"
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$dir/data" -m fast stop

The cluster listens on its unix socket only (no TCP port), keeps
PostgreSQL's durable defaults (``fsync``, ``synchronous_commit``: a commit
waits for its WAL flush, as SQLite's ``synchronous=FULL`` does), and is
owned by the ``postgres`` user when run as root. Each benchmark run gets a
database of its own (:meth:`ThrowawayCluster.new_database`).

The database's CPU time (:meth:`ThrowawayCluster.cpu_seconds`) is read from
``/proc``: the postmaster's user and system time, the time of its children
that ended (which the kernel adds to it when it reaps them) and that of its
live children (the backends serving the relays, the WAL writer, the
checkpointer), so that a backend ending mid-run is neither lost nor counted
twice.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
import tempfile

# Where Debian installs the server binaries (one folder per major version).
PG_BIN_PATTERN = "/usr/lib/postgresql/*/bin"
# The user the server runs as when we are root (it refuses to run as root).
PG_USER = "postgres"
# Seconds a start or stop of the cluster may take.
PG_CTL_TIMEOUT = 60


class ClusterError(Exception):
    """The cluster could not be started or used: the message says why."""


def find_pg_bin() -> str | None:
    """The folder of ``initdb`` and ``pg_ctl``: the newest Debian one, else from PATH."""
    found = sorted(
        (d for d in glob.glob(PG_BIN_PATTERN) if os.path.exists(os.path.join(d, "initdb"))),
        key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (field 3 on), or None if it ended."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
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
    # Fields 14-17 of stat (utime, stime, cutime, cstime) are 11-14 from field 3.
    ticks = sum(int(f) for f in fields[11:15])
    pending = _children(root)
    while pending:
        pid = pending.pop()
        child = _stat_fields(pid)
        if child is not None:
            ticks += int(child[11]) + int(child[12])
            pending.extend(_children(pid))
    return ticks / _clock_ticks()


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


class ThrowawayCluster:
    """A PostgreSQL cluster in a new temporary directory, stopped and deleted by :meth:`stop`.

    ClusterError if the server binaries are missing or the server does not start.
    """

    def __init__(self, parent_dir: str | None = None) -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise ClusterError(
                "no PostgreSQL server binaries (initdb, pg_ctl); on Debian: apt-get install "
                "postgresql"
            )
        self._bin = bin_dir
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(PG_USER)
            except KeyError:
                raise ClusterError(
                    f"running as root, and there is no {PG_USER!r} user to run the server"
                ) from None
            parent = os.path.abspath(parent_dir or tempfile.gettempdir())
            if not _reachable(parent, owner.pw_uid):
                raise ClusterError(
                    f"the {PG_USER} user cannot reach {parent}: give a folder it can reach, "
                    "such as /tmp"
                )
        self.directory = tempfile.mkdtemp(prefix="hushchat-pg-", dir=parent_dir)
        self.data = os.path.join(self.directory, "data")
        self._databases = 0
        self._started = False
        try:
            if owner is not None:
                os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", self.data, "-U", PG_USER, "-A", "trust", "--no-sync")
            options = f"-k {self.directory} -c listen_addresses=''"
            log = os.path.join(self.directory, "log")
            self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-o", options, "start")
            self._started = True
        except BaseException:
            self.stop()
            raise

    def _run(self, program: str, *args: str) -> None:
        command = [os.path.join(self._bin, program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", PG_USER, "--", *command]
        try:
            subprocess.run(
                command, check=True, capture_output=True, text=True, timeout=PG_CTL_TIMEOUT
            )
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise ClusterError(f"{program} failed: {last[0]}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"{program} failed: {exc}") from None

    def url(self, database: str = "postgres") -> str:
        """A connection string for ``database`` over the cluster's unix socket."""
        return f"postgresql://{PG_USER}@/{database}?host={self.directory}"

    def new_database(self) -> str:
        """Create a new empty database; its connection string."""
        self._databases += 1
        name = f"bench{self._databases}"
        self._run("createdb", "-h", self.directory, "-U", PG_USER, name)
        return self.url(name)

    @property
    def postmaster_pid(self) -> int:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as pid_file:
                return int(pid_file.readline())
        except (OSError, ValueError):
            raise ClusterError("the cluster is not running") from None

    def cpu_seconds(self) -> float:
        """The CPU seconds the cluster's processes used so far."""
        return process_tree_cpu_seconds(self.postmaster_pid)

    def stop(self) -> None:
        """Stop the server (if it started) and delete its directory."""
        try:
            if self._started:
                self._started = False
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
