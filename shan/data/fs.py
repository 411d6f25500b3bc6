"""Paths that are local folders or ``s3://`` URLs, through ``pyarrow.fs``.

S3 settings come from the usual variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which pyarrow, s3fs and Ray honour alike.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from shan.errors import StorageError


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str) -> Path:
    """The local path of a path or ``file://`` URL (``file:///tmp/x`` -> ``/tmp/x``)."""
    text = str(uri)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return str(Path(local_path(root), *parts))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` URL or remote URL."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).absolute())
    try:
        kwargs = {}
        if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
            kwargs["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
        if uri.startswith("s3://"):
            bucket_path = uri[len("s3://") :]
            fs = pafs.S3FileSystem(
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                connect_timeout=5,
                request_timeout=30,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
                **kwargs,
            )
            return fs, bucket_path.rstrip("/")
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    except Exception as e:  # pyarrow raises several types for bad URLs
        raise StorageError(f"cannot open {uri}: {e}") from e


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"cannot reach {uri}: {e}") from e


def size(uri: str) -> int:
    """Bytes in the file ``uri``."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"cannot reach {uri}: {e}") from e
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri} is not a file")
    return info.size


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from e


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file too big


def out_of_space(e: BaseException) -> int | None:
    """The errno when ``e`` (or what it was raised from) is a full disk, a quota or a file too
    big (:data:`NO_SPACE`); else None."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    return None


def write_error(e: BaseException, where: str) -> StorageError:
    """The one-line StorageError naming ``where`` for an error met writing there; a full disk
    in plain words (pyarrow's message repeats the errno and a detail)."""
    code = out_of_space(e)
    if code is not None:
        return StorageError(f"cannot write {where}: {os.strerror(code).lower()} (errno {code})")
    return StorageError(f"cannot write {where}: {e}")


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    try:
        fs.create_dir(posixpath.dirname(path) if is_remote(uri) else str(Path(path).parent))
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise write_error(e, uri) from e


def write_atomic(
    uri: str | Path,
    data: bytes | Callable[[BinaryIO], object],
    *,
    make_parents: bool = False,
) -> None:
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``uri`` so that
    a reader sees the old file or the whole new one, never part of it.

    Local: into a temporary file beside it (``.NAME.tmp-XXXXXXXX``), synced, made mode 0644,
    then renamed over ``uri``; a failure removes the temporary and leaves what was there (and
    raises the OSError, or the writer's exception). ``s3://``: one object PUT, which is atomic;
    a failure is a StorageError. ``make_parents``: create a missing local folder first (a
    remote store has no folders to create)."""
    if is_remote(str(uri)):
        if not isinstance(data, bytes):
            buf = io.BytesIO()
            data(buf)
            data = buf.getvalue()
        write_bytes(str(uri), data)
        return
    path = local_path(str(uri))
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(uri: str) -> None:
    """Fail early, with the location named, when ``uri``'s bucket or parent is unreachable."""
    fs, path = filesystem(uri)
    probe = path.split("/", 1)[0] if is_remote(uri) else str(Path(path).parent)
    try:
        info = fs.get_file_info(probe)
    except OSError as e:
        raise StorageError(f"cannot reach {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        what = "bucket" if is_remote(uri) else "parent folder"
        raise StorageError(f"cannot write {uri}: the {what} {probe} does not exist")


def list_files(uri: str) -> list[str]:
    """Paths, relative to ``uri``, of every file under the folder or prefix ``uri`` (empty when
    it does not exist). Locally, links are followed but never back into a folder already
    walked (:func:`walk_files`)."""
    if not is_remote(uri):
        return walk_files(local_path(uri))
    fsys, root = filesystem(uri)
    try:
        infos = fsys.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {e}") from e
    root = root.rstrip("/")
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def walk_files(folder: Path) -> list[str]:
    """Paths, relative to ``folder``, of the files under it, through links to files and folders.
    Each folder is walked once: the real folders first, then the folders links lead to that
    were not walked yet (a link to itself or to a parent is not followed, so a loop of links
    ends). StorageError when a folder cannot be listed."""
    if not folder.is_dir():
        return []
    seen: set[tuple[int, int] | None] = set()
    out: list[str] = []
    todo = [str(folder)]  # folders to walk: the given one, then those links lead to

    def fail(e: OSError) -> None:
        raise StorageError(f"cannot list {e.filename or folder}: {e.strerror or e}")

    while todo:
        for root, dirs, names in os.walk(todo.pop(0), onerror=fail, followlinks=False):
            if _key(root) in seen:
                dirs[:] = []
                continue
            seen.add(_key(root))
            todo += [os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
            rel = os.path.relpath(root, folder)
            for name in names:
                if os.path.isfile(os.path.join(root, name)):  # not a dangling link, pipe, ...
                    out.append(name if rel == "." else os.path.join(rel, name))
    return sorted(out)


def _key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def delete_file(uri: str) -> None:
    """Delete one file; a file already gone is fine."""
    fsys, path = filesystem(uri)
    try:
        fsys.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot delete {uri}: {e}") from e


def delete_tree(uri: str) -> None:
    fsys, path = filesystem(uri)
    try:
        kind = fsys.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fsys.delete_dir(path)
        elif kind == pafs.FileType.File:
            fsys.delete_file(path)
    except OSError:
        pass
