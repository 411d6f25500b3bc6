"""Where a data set is written: checked before any work, swapped in at the end.

A destination is accepted when nothing is there, when it is an empty folder, or, with
``overwrite``, when it holds one of our data sets (its card present). Anything else (a folder
or prefix with other files, a file, a card that cannot be read) is refused with one line naming
it, so a writer never deletes or overwrites what the project did not write.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from shan.data import fs
from shan.data.format import CARD, DataError, DatasetCard

GENERATION = re.compile(r"^gen-\d{8}T\d{6}-[0-9a-f]{8}/")  # an s3:// write's own prefix
MARKER = ".shan-writing"  # in a local staging folder while it is written: host and pid


def inspect(
    dest: str, overwrite: bool, log: Callable[[str], None] = print
) -> LocalTarget | S3Target:
    """Check ``dest`` and return the target to write it through; DataError when refused."""
    fs.check_writable(dest)
    if fs.is_remote(dest):
        return S3Target(dest, _s3_existing(dest, overwrite, log))
    return LocalTarget(dest, _local_existing(dest, overwrite, log))


def check_apart(src: str | Path, dest: str) -> None:
    """A conversion never writes into its own source (nor the source into its output)."""
    if fs.is_remote(dest):
        return
    s, d = Path(src).resolve(), Path(dest).resolve()
    if s == d or s in d.parents or d in s.parents:
        raise DataError(
            f"--out {dest} overlaps the source folder {src}: write the data set somewhere else"
        )


def _foreign(files: list[str], card: DatasetCard | None) -> list[str]:
    ours = {CARD, *card.files()} if card else set()
    return [f for f in files if f not in ours and not GENERATION.match(f)]


def _read_card(dest: str) -> DatasetCard:
    where = fs.join(dest, CARD)
    try:
        return DatasetCard.from_json(fs.read_bytes(where), where)
    except DataError as e:
        raise DataError(f"{e}; refusing to write over it") from None


def _refuse_foreign(dest: str, foreign: list[str], card: DatasetCard | None) -> None:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    what = "files that are not part of its data set" if card else "files"
    raise DataError(
        f"--out {dest} already holds {what} ({shown}); nothing was written: choose a new or "
        "empty location"
    )


def _existing(dest: str, files: list[str], overwrite: bool) -> DatasetCard | None:
    card = _read_card(dest) if CARD in files else None
    if card is not None and not overwrite:
        raise DataError(f"{dest} already holds a data set (pass --overwrite to replace it)")
    return card


# -- local folders ----------------------------------------------------------------------------
def _local_existing(given: str, overwrite: bool, log: Callable[[str], None]) -> DatasetCard | None:
    dest = Path(given).resolve()  # through a link to the real folder, which is swapped
    if str(dest) != given:
        given = f"{given} ({dest})"
    if dest.exists() and not dest.is_dir():
        raise DataError(f"--out {given} is a file, not a folder; nothing was written")
    _check_parent(dest, given)
    _remove_dead_stages(dest, log)
    files, others = local_entries(dest)
    card = _existing(str(dest), files, overwrite)
    foreign = [f for f in files if f not in ({CARD, *card.files()} if card else set())]
    if foreign or others:
        _refuse_foreign(given, foreign + others, card)
    return card


def _check_parent(dest: Path, given: str) -> None:
    """The staging folder is made beside ``dest`` and renamed onto it: the parent must be a
    writable folder on the same file system (``dest`` a mount point cannot be swapped)."""
    parent = dest.parent
    if not parent.is_dir():
        raise DataError(f"--out {given}: the parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {given}: the parent folder {parent} is not writable")
    if dest.exists() and os.stat(dest).st_dev != os.stat(parent).st_dev:
        raise DataError(
            f"--out {given} is a mount point, which cannot be swapped: write into a folder "
            "inside it"
        )


def local_entries(folder: Path) -> tuple[list[str], list[str]]:
    """(regular files, anything else but folders: links, pipes, ...) under ``folder``, as
    relative paths; links are never followed."""
    files: list[str] = []
    others: list[str] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in [*names, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            regular = os.path.isfile(path) and not os.path.islink(path)
            (files if regular else others).append(rel)
    return sorted(files), sorted(others)


def _stages(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.partial-*"))


def _remove_dead_stages(dest: Path, log: Callable[[str], None]) -> None:
    """Staging folders of this destination left by a killed write on this host."""
    for stage in _stages(dest):
        try:
            owner = json.loads((stage / MARKER).read_text())
        except (OSError, ValueError):
            continue  # not recognisably ours: left alone
        if owner.get("host") == socket.gethostname() and not _alive(owner.get("pid")):
            shutil.rmtree(stage, ignore_errors=True)
            log(f"removed {stage}: the staging folder of an interrupted write")


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalTarget:
    """Built in a hidden folder beside ``dest``, swapped in when complete."""

    def __init__(self, dest: str, old: DatasetCard | None) -> None:
        self.dest, self.old = Path(dest).resolve(), old
        self.path = self.dest.parent / f".{self.dest.name}.partial-{secrets.token_hex(4)}"

    def stage(self) -> tuple[str, str]:
        try:
            self.path.mkdir()
            owner = {"host": socket.gethostname(), "pid": os.getpid(), "dest": str(self.dest)}
            (self.path / MARKER).write_text(json.dumps(owner))
        except OSError as e:
            raise fs.StorageError(f"cannot make the staging folder {self.path}: {e}") from e
        return str(self.path), ""

    def discard(self, created: list[str]) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # the staging folder: all of it is ours

    def commit(
        self, card: DatasetCard, created: list[str], log: Callable[[str], None] = print
    ) -> None:
        try:
            _write_durably(self.path / CARD, card.to_json().encode())
            (self.path / MARKER).unlink()
            old = self._swap()
        except OSError as e:
            self.discard(created)
            msg = f"cannot put the new data set in place at {self.dest}: {e}"
            raise fs.StorageError(msg) from None
        except BaseException:
            self.discard(created)
            raise
        if old is not None:  # the new data set is in place: from here on, nothing may fail it
            try:
                _remove_listed(self.path, sorted(old))
            except OSError as e:
                log(f"note: the previous data set's files are left in {self.path} ({e})")

    def _swap(self) -> set[str] | None:
        """Put the staging folder in place; the old data set's files (now at ``self.path``)."""
        files, others = local_entries(self.dest)
        if self.old is None:
            if files or others:
                _refuse_foreign(str(self.dest), files + others, None)
            if self.dest.exists():
                _remove_listed(self.dest, [])  # empty (sub)folders only
            os.rename(self.path, self.dest)
            return None
        ours = {CARD, *self.old.files()}
        foreign = [f for f in files if f not in ours] + others
        if foreign:
            _refuse_foreign(str(self.dest), foreign, self.old)
        exchange(self.path, self.dest)
        return ours


def _remove_listed(folder: Path, files: list[str]) -> None:
    """Remove ``files`` of ``folder``, then its empty folders (never through a link); anything
    else stays."""
    for f in files:
        (folder / f).unlink(missing_ok=True)
    for root, dirs, _ in os.walk(folder, topdown=False, followlinks=False):
        for d in dirs:
            path = os.path.join(root, d)
            if not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)
    if folder.is_dir() and not folder.is_symlink() and not os.listdir(folder):
        folder.rmdir()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); where the kernel or
    file system lacks it, two renames, the new one moved in right after the old one out."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(_AT_FDCWD, bytes(a), _AT_FDCWD, bytes(b), _RENAME_EXCHANGE) == 0:
            return
    aside = a.with_name(a.name + ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


# -- s3:// prefixes ---------------------------------------------------------------------------
def _s3_existing(dest: str, overwrite: bool, log: Callable[[str], None]) -> DatasetCard | None:
    fsys, path = fs.filesystem(dest)
    if fsys.get_file_info(path).type == pafs.FileType.File:
        raise DataError(f"--out {dest} is an object, not a prefix; nothing was written")
    files = fs.list_files(dest)
    card = _existing(dest, files, overwrite)
    if card is None:
        foreign = _foreign(files, None)
        if foreign:
            _refuse_foreign(dest, foreign, None)
    leftovers = sorted({f.split("/", 1)[0] for f in files if GENERATION.match(f)})
    in_use = {f.split("/", 1)[0] for f in card.files()} if card else set()
    stale = [g for g in leftovers if g not in in_use]
    if stale:
        log(
            f"note: {dest} holds {', '.join(stale)}: files of an interrupted write (no card "
            "lists them); delete them when no other write to this location is running"
        )
    return card


class S3Target:
    """New files under a prefix of their own; the card last; then the old card's files go."""

    def __init__(self, dest: str, old: DatasetCard | None) -> None:
        self.dest, self.old = dest.rstrip("/"), old
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.prefix = f"gen-{stamp}-{secrets.token_hex(4)}/"

    def stage(self) -> tuple[str, str]:
        return self.dest, self.prefix

    def discard(self, created: list[str]) -> None:
        for f in created:  # only keys this write created
            try:
                fs.delete_file(fs.join(self.dest, f))
            except fs.StorageError:
                pass

    def commit(
        self, card: DatasetCard, created: list[str], log: Callable[[str], None] = print
    ) -> None:
        try:
            fs.write_bytes(fs.join(self.dest, CARD), card.to_json().encode())
        except BaseException:
            self.discard(created)
            raise
        if self.old is None:
            return
        keep = {CARD, *card.files()}  # the new card is in place: nothing may fail it now
        for f in self.old.files():
            if f not in keep:
                try:
                    fs.delete_file(fs.join(self.dest, f))
                except fs.StorageError as e:
                    log(f"note: {f} of the previous data set is left in {self.dest} ({e})")
