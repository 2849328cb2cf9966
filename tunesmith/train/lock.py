"""One run per output folder: an advisory lock held for the whole run.

The lock is `fcntl.flock` on `<folder>/.tunesmith.train.lock`, so the kernel releases it when the
process ends in any way (kill -9 included): a lock left by a dead run is never in the way. The
file records the holder (pid, host, start time) for the message another run gets, and says
whether the previous holder ended without releasing it (a stale lock, taken over)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tunesmith.errors import TunesmithError

LOCK_NAME = ".tunesmith.train.lock"


class FolderLock:
    """Hold the lock on `folder` from `acquire()` until `release()` (or process exit)."""

    def __init__(self, folder: str | os.PathLike, what: str = "output_dir") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self.took_over: dict | None = None
        """The record of a holder that ended without releasing the lock, when there was one."""

    def acquire(self) -> FolderLock:
        import fcntl

        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except (FileExistsError, NotADirectoryError):
            raise TunesmithError(
                f"{self.what} {folder} is a file (or lies under one); give a folder"
            ) from None
        except OSError as err:
            raise TunesmithError(
                f"{self.what} {folder}: cannot write there ({err.strerror}); give a folder you "
                "can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            who = _describe(holder) if holder else "another process"
            raise TunesmithError(
                f"{self.what} {self.path.parent} is in use by another run ({who}); wait for it "
                f"to finish, or use another {self.what}"
            ) from None
        previous = _read_record(fd)
        if previous and not previous.get("released"):
            self.took_over = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        _write_record(fd, record)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            _write_record(self._fd, {"released": True})
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _read_record(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict) -> None:
    data = json.dumps(record).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)


def _describe(record: dict) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {when}"


def stale_message(record: dict, folder: Path) -> str:
    return (
        f"{folder}: the previous run ({_describe(record)}) ended without releasing its lock "
        "(killed?); taking it over"
    )
