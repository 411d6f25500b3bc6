"""One evaluation at a time per output location: a lock in ``--out``.

Local: ``fcntl.flock`` on ``OUT/eval.lock``; the kernel releases it when the process ends, however
it ends. The file stays (removing a lock file that others may have opened would let two
processes hold "the" lock); it names the last holder.

``s3://``: the object ``OUT/eval.lock``, created only if absent (``If-None-Match: *``), holding
the owner (host, pid, a random token) and a heartbeat time that a thread renews every
``heartbeat_s`` seconds with ``If-Match`` on the lock's last ETag. A lock whose heartbeat is older
than ``stale_s`` (its holder died without removing it) is taken over, again with ``If-Match``, so
two takers cannot both win. A holder that finds its lock taken (its heartbeat failed) stops
writing: :meth:`OutLock.check` raises before each write. The lock is removed at the end.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from shan.data import fs
from shan.errors import JobError

LOCK_NAME = "eval.lock"
STALE_S = 300.0
HEARTBEAT_S = 30.0


def _describe(text: bytes | str) -> str:
    """The holder named in a lock's contents, for the error message."""
    try:
        info = json.loads(text)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f"host {info['host']}, pid {info['pid']}, since {when}"
    except (ValueError, KeyError, TypeError, OverflowError):
        return "holder unknown"


class OutLock:
    """``with OutLock(out): ...``; JobError when another evaluation holds ``out``."""

    def __init__(
        self,
        out: str,
        stale_s: float = STALE_S,
        heartbeat_s: float = HEARTBEAT_S,
        log: Callable[[str], None] = print,
    ) -> None:
        self.out, self.path = out, fs.join(out, LOCK_NAME)
        self.stale_s, self.heartbeat_s, self.log = stale_s, heartbeat_s, log
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._fd: int | None = None
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "started": self.started,
            "heartbeat": time.time(),
        }
        return json.dumps(info).encode()

    def _held(self, holder: str) -> JobError:
        return JobError(
            f"--out {self.out} is being written by another evaluation ({holder}); lock "
            f"{self.path}. Wait for it, or use another --out"
        )

    # -- local ----------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        import fcntl

        folder = Path(self.out)
        if folder.exists() and not folder.is_dir():
            raise JobError(f"--out {self.out} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise fs.StorageError(f"cannot write {self.path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise self._held(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._body(), 0)
        self._fd = fd

    def _release_local(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    # -- s3 -------------------------------------------------------------------------------------
    def _s3(self) -> tuple[Any, str, str]:
        import s3fs

        bucket, _, key = self.path[len("s3://") :].partition("/")
        return s3fs.S3FileSystem(), bucket, key

    def _acquire_s3(self) -> None:
        s3, bucket, key = self._s3()
        for _ in range(3):
            try:
                r = s3.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*"
                )
                self._etag = r["ETag"]
                return
            except FileExistsError:
                pass  # held: by a live evaluation, or a stale lock
            except OSError as e:
                raise fs.StorageError(f"cannot write {self.path}: {e}") from e
            try:
                text, etag, modified = _get(s3, bucket, key)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError as e:
                raise fs.StorageError(f"cannot read {self.path}: {e}") from e
            age = time.time() - _heartbeat(text, modified)
            if age < self.stale_s:
                raise self._held(_describe(text))
            try:
                r = s3.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag
                )
            except OSError:
                continue  # someone else took it over, or it was released: look again
            self._etag = r["ETag"]
            self.log(
                f"{self.path}: took over a stale lock ({_describe(text)}, last heartbeat "
                f"{age:.0f} s ago)"
            )
            return
        raise self._held("it changed hands while this job tried to take it")

    def beat(self) -> bool:
        """Renew the heartbeat if the lock is still ours; False (and :meth:`check` raises from
        now on) when it was taken over or removed."""
        if self._lost:
            return False
        s3, bucket, key = self._s3()
        try:
            r = s3.call_s3(
                "put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=self._etag
            )
            self._etag = r["ETag"]
        except FileNotFoundError:
            self._lost = "the lock was removed"
        except OSError as e:
            if _precondition_failed(e):
                self._lost = "another evaluation took the lock over"
            # else a transient error: try again at the next beat (stale only after stale_s)
        return not self._lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.beat():
                return

    def _release_s3(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._etag is None or self._lost:
            return
        s3, bucket, key = self._s3()
        try:
            s3.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
        except OSError:
            pass  # not ours any more, or gone: nothing to remove
        self._etag = None

    # -- both -----------------------------------------------------------------------------------
    def acquire(self) -> OutLock:
        if fs.is_remote(self.out):
            if not self.out.startswith("s3://"):
                raise JobError(f"--out {self.out}: only local folders and s3:// are supported")
            self._acquire_s3()
            self._thread = threading.Thread(target=self._beat, daemon=True, name="eval-lock")
            self._thread.start()
        else:
            self._acquire_local()
        return self

    def check(self) -> None:
        """JobError when the lock was lost (taken over as stale); called before each write."""
        if self._lost:
            raise JobError(f"{self.path}: {self._lost}; this evaluation stops writing")

    def release(self) -> None:
        if fs.is_remote(self.out):
            self._release_s3()
        else:
            self._release_local()

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _get(s3: Any, bucket: str, key: str) -> tuple[bytes, str, Any]:
    """(contents, ETag, LastModified) of one object, from one GET."""
    from fsspec.asyn import sync

    async def get() -> tuple[bytes, str, Any]:
        r = await s3._call_s3("get_object", Bucket=bucket, Key=key)
        async with r["Body"] as stream:
            data = await stream.read()
        return data, r["ETag"], r.get("LastModified")

    return sync(s3.loop, get)


def _precondition_failed(e: OSError) -> bool:
    """An If-Match / If-None-Match refusal (HTTP 412 or 409), as s3fs reports it."""
    cause = e.__cause__ or e.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
    text = str(e).lower()
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-condition" in text


def _heartbeat(text: bytes, last_modified: datetime | None) -> float:
    """The lock's heartbeat time; its S3 modification time when the contents are unreadable."""
    try:
        return float(json.loads(text)["heartbeat"])
    except (ValueError, KeyError, TypeError):
        return last_modified.timestamp() if last_modified is not None else 0.0
