"""One writer per directory: `train` and `demo` (the run directory), `prepare` (its output
directory) and `score` (its --out) hold an exclusive lock while they write, and a second command
on the same directory is refused with the holder named, instead of both writing the same
checkpoints and fighting over one MLflow store.

The lock is the operating system's (flock on `<dir>/.sabiscale.lock`): it goes with the process,
so a run killed with -9 leaves no stale lock behind, and a launcher that restarts a run is never
refused by the run it replaces. The file records the holder (host, pid, command, since) for the
message. Multi-rank runs take it once, on global rank 0. On NFS, flock is honoured across hosts
only where the mount supports locking (NFSv4 does).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from sabiscale.errors import AlreadyExists

LOCK_NAME = ".sabiscale.lock"


class DirectoryLock:
    def __init__(self, directory: Path, command: str, take: bool = True) -> None:
        self.directory, self.command, self.take = Path(directory), command, take
        self.file = None

    def __enter__(self) -> "DirectoryLock":
        if not self.take:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = open(self.directory / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = describe(self.file.read())
            self.file.close()
            raise AlreadyExists(f"{self.directory} is in use by {holder}; wait for it to finish (or stop it), or "
                                "give this command another directory (output_dir=... for a run); nothing was "
                                "written") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}) + "\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def describe(recorded: str) -> str:
    try:
        holder = json.loads(recorded)
        return (f"`sabiscale {holder['command']}` (pid {holder['pid']} on {holder['host']}, since "
                f"{holder['since']})")
    except (ValueError, KeyError):
        return "another sabiscale command"
