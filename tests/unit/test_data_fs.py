"""Local paths and ``s3://`` URLs (``shan.data.fs``): which are remote, how they are joined, and
the local reads, writes, listings (never around a loop of links) and deletions, each failure
(a full disk too) a StorageError naming the path.
No S3 endpoint is contacted: an S3 filesystem is only built, never used."""

from __future__ import annotations

import errno
import os
import re

import pytest

from shan.data import fs
from shan.data.fs import StorageError
from tests.helpers import mounted_tmpfs


@pytest.mark.parametrize(
    "uri, remote",
    [
        ("s3://bucket/key", True),
        ("gs://bucket", True),
        ("/abs/path", False),
        ("rel/path", False),
        ("file:///abs/path", False),
        ("C:\\data", False),
    ],
)
def test_is_remote(uri, remote):
    assert fs.is_remote(uri) is remote


def test_join_local_and_remote(tmp_path):
    assert fs.join(str(tmp_path), "a", "b.npy") == str(tmp_path / "a" / "b.npy")
    assert fs.join("rel", "x") == os.path.join("rel", "x")
    # a URL keeps its double slash and loses a trailing one; the parts join with "/"
    assert fs.join("s3://bkt/pre/", "a", "b.npy") == "s3://bkt/pre/a/b.npy"
    assert fs.join("s3://bkt", "dataset.json") == "s3://bkt/dataset.json"
    assert fs.join("s3://bkt/pre//", "x") == "s3://bkt/pre/x"


def test_a_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fsys, path = fs.filesystem("rel/x.bin")
    assert fsys.type_name == "local" and path == str(tmp_path.resolve() / "rel" / "x.bin")


def test_an_s3_filesystem_takes_endpoint_and_region_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    fsys, path = fs.filesystem("s3://bkt/pre/fix/")
    assert fsys.type_name == "s3" and path == "bkt/pre/fix"
    settings = fsys.__reduce__()[1][0]  # what pyarrow pickles: the options it was built with
    assert settings["endpoint_override"] == "http://127.0.0.1:9"
    assert settings["region"] == "eu-west-3"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    settings = fs.filesystem("s3://bkt")[0].__reduce__()[1][0]
    assert settings["endpoint_override"] == "" and settings["region"] == "us-east-1"


def test_an_unknown_scheme_is_a_storage_error_naming_the_url():
    with pytest.raises(StorageError, match="cannot open nope://x/y"):
        fs.filesystem("nope://x/y")
    with pytest.raises(StorageError, match="nope://x/y"):
        fs.read_bytes("nope://x/y")


def test_write_read_size_exists_locally(tmp_path):
    target = str(tmp_path / "a" / "b" / "c.bin")  # parents are made
    assert not fs.exists(target)
    fs.write_bytes(target, b"hello")
    assert fs.exists(target) and fs.exists(str(tmp_path / "a"))
    assert fs.read_bytes(target) == b"hello" and fs.size(target) == 5
    fs.write_bytes(target, b"")  # replaced, not appended
    assert fs.read_bytes(target) == b"" and fs.size(target) == 0


def test_local_failures_are_storage_errors_naming_the_path(tmp_path):
    missing = str(tmp_path / "missing.json")
    with pytest.raises(StorageError, match=f"^{re.escape(missing)} does not exist$"):
        fs.read_bytes(missing)
    with pytest.raises(StorageError, match=f"{re.escape(missing)} is not a file"):
        fs.size(missing)
    with pytest.raises(StorageError, match=f"cannot read {re.escape(str(tmp_path))}"):
        fs.read_bytes(str(tmp_path))  # a folder
    with pytest.raises(StorageError, match=f"{re.escape(str(tmp_path))} is not a file"):
        fs.size(str(tmp_path))
    (tmp_path / "file").write_text("x")
    under_a_file = str(tmp_path / "file" / "child.bin")
    with pytest.raises(StorageError, match=f"cannot write {re.escape(under_a_file)}"):
        fs.write_bytes(under_a_file, b"x")
    assert issubclass(StorageError, OSError)


def test_check_writable_names_a_missing_parent(tmp_path):
    fs.check_writable(str(tmp_path / "new.bin"))  # the parent exists: fine
    target = str(tmp_path / "no" / "such" / "new.bin")
    parent = str(tmp_path / "no" / "such")
    want = f"cannot write {target}: the parent folder {parent} does not exist"
    with pytest.raises(StorageError, match=re.escape(want)):
        fs.check_writable(target)


def test_list_files_is_recursive_sorted_and_relative(tmp_path):
    for name in ("b.txt", "a/z.bin", "a/b/c.bin"):
        fs.write_bytes(str(tmp_path / "root" / name), b"x")
    (tmp_path / "root" / "empty").mkdir()  # folders are not listed
    assert fs.list_files(str(tmp_path / "root")) == ["a/b/c.bin", "a/z.bin", "b.txt"]
    assert fs.list_files(str(tmp_path / "root") + "/") == ["a/b/c.bin", "a/z.bin", "b.txt"]
    assert fs.list_files(str(tmp_path / "nowhere")) == []


def test_delete_file_and_tree_tolerate_what_is_gone(tmp_path):
    root = tmp_path / "root"
    for name in ("keep.txt", "gone.txt", "sub/x.bin"):
        fs.write_bytes(str(root / name), b"x")
    fs.delete_file(str(root / "gone.txt"))
    fs.delete_file(str(root / "gone.txt"))  # already gone: fine
    assert fs.list_files(str(root)) == ["keep.txt", "sub/x.bin"]
    fs.delete_tree(str(root / "keep.txt"))  # a file is deleted too
    assert fs.list_files(str(root)) == ["sub/x.bin"]
    fs.delete_tree(str(root))
    assert not root.exists()
    fs.delete_tree(str(root))  # nothing there: fine


def test_a_file_url_names_the_local_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    assert fs.read_bytes(tmp_path.as_uri() + "/a.txt") == b"abc"


def test_write_atomic_replaces_the_whole_file_readable_by_all(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    fs.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    fs.write_atomic(target, lambda f: f.write(b"streamed"))  # a writer function, a Path
    assert target.read_bytes() == b"streamed"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary left


def test_write_atomic_failing_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def half(f):
        f.write(b"half of it")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fs.write_atomic(str(target), half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_write_atomic_makes_the_folder_only_when_asked(tmp_path):
    gone = tmp_path / "gone" / "x.bin"
    with pytest.raises(FileNotFoundError):
        fs.write_atomic(str(gone), b"x")
    assert not gone.parent.exists()
    fs.write_atomic(str(gone), b"x", make_parents=True)
    assert gone.read_bytes() == b"x"


def test_links_back_into_walked_folders_are_not_followed(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "b.jpg").write_bytes(b"b")
    (root / "self1").symlink_to(".")
    (root / "self2").symlink_to(root)  # two links to itself: the loop
    (root / "sub" / "up").symlink_to("..")
    (root / "alias").symlink_to("sub")  # a second way to a folder walked: once is enough
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "c.jpg").write_bytes(b"c")
    (outside / "back").symlink_to(root)
    (root / "more").symlink_to(outside)  # a folder only a link leads to is walked
    (root / "file-link.jpg").symlink_to(root / "a.jpg")
    (root / "dangling.jpg").symlink_to(tmp_path / "gone")
    assert fs.list_files(str(root)) == ["a.jpg", "file-link.jpg", "more/c.jpg", "sub/b.jpg"]


def test_walk_files_of_a_missing_folder_is_empty_and_an_unreadable_one_named(tmp_path):
    assert fs.walk_files(tmp_path / "nope") == []
    if os.geteuid() == 0:
        pytest.skip("root reads any folder: the unreadable case needs another user")
    locked = tmp_path / "a" / "locked"
    locked.mkdir(parents=True)
    locked.chmod(0)
    try:
        with pytest.raises(fs.StorageError, match=f"cannot list {locked}"):
            fs.walk_files(tmp_path / "a")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_is_recognised_directly_or_behind_another_error(code):
    full = OSError(code, "Error writing bytes to file. Detail: [errno 28] No space left")
    assert fs.out_of_space(full) == code
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file") from e
    except RuntimeError as wrapped:
        assert fs.out_of_space(wrapped) == code
    assert fs.out_of_space(OSError(errno.EACCES, "denied")) is None
    assert fs.out_of_space(ValueError("no space left")) is None


def test_write_error_is_one_line_naming_where():
    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left")
    e = fs.write_error(full, "the data set /mnt/x")
    assert isinstance(e, fs.StorageError)
    assert str(e) == "cannot write the data set /mnt/x: no space left on device (errno 28)"
    other = fs.write_error(OSError(errno.EACCES, "Permission denied"), "/mnt/y")
    assert str(other) == "cannot write /mnt/y: [Errno 13] Permission denied"


def test_write_bytes_on_a_full_disk_names_the_file(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "64k") as small:
        target = small / "big.bin"
        with pytest.raises(fs.StorageError, match=rf"cannot write {target}: no space left"):
            fs.write_bytes(str(target), b"x" * 200_000)
