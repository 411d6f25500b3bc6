"""Bad inputs of ``prepare_data.py images``, through the real command line: exit 2, one line
naming the image, file or option, no traceback, the user's files untouched and nothing that
looks like a finished data set left behind. Cases that need decoding run with ``--local``
(the same decode and extract steps, in process); the Ray path is the integration test's. The
cases run through the job's ``main`` in the test process, one as a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import Case, assert_user_error, run_case, run_job, snapshot
from tests.helpers import make_images

FAST = ["--arch", "resnet50", "--image-size", "64", "--grid", "2", "--min-count", "1", "--local"]


def images(tmp: Path, *extra: str, edit=None, captions: str = "captions.csv") -> list[str]:
    imgs = make_images(tmp / "imgs", 3)
    if edit is not None:
        edit(imgs)
    cap = str(imgs / captions) if captions else str(tmp / "missing.csv")
    return ["images", str(imgs), "--captions", cap, "--out", str(tmp / "out"), *FAST, *extra]


def write(name: str, data: bytes):
    return lambda imgs: (imgs / name).write_bytes(data)


def tiny(imgs: Path) -> None:
    from PIL import Image

    Image.new("RGB", (12, 40)).save(imgs / "img1.png")


def caption_rows(text: str):
    return lambda imgs: (imgs / "captions.csv").write_text(text)


def scan_files(imgs: Path) -> None:
    (imgs / "caps.txt").write_text("a\nb\nc\n")
    (imgs / "list.txt").write_text("img0.jpg\nimg1.png\n")


def self_links(imgs: Path) -> None:
    """Two links of the images folder to itself (a walk that follows them never ends)."""
    (imgs / "again").symlink_to(".")
    (imgs / "and-again").symlink_to(imgs)


CASES = [
    Case("image-missing", "prepare_data", "a caption naming an image that is not there",
         lambda t: images(t, edit=lambda i: (i / "img2.jpg").unlink()),
         ("captions.csv, line 6", "'img2.jpg'", "is not in")),
    Case("images-folder-links-to-itself", "prepare_data",
         "an images folder holding two links to itself (and a caption naming a missing image)",
         lambda t: images(t, edit=lambda i: (self_links(i), (i / "img2.jpg").unlink())),
         ("captions.csv, line 6", "'img2.jpg'", "is not in")),
    Case("image-corrupt", "prepare_data", "an image that fails to decode",
         lambda t: images(t, edit=write("img1.png", b"\x89PNG\r\n\x1a\nbroken")),
         ("img1.png", "cannot be decoded", "--on-bad-image skip"), subprocess=True),
    Case("image-empty", "prepare_data", "an empty image file",
         lambda t: images(t, edit=write("img1.png", b"")), ("img1.png", "empty file")),
    Case("image-tiny", "prepare_data", "an image smaller than `--min-side`",
         lambda t: images(t, edit=tiny), ("img1.png", "12x40", "--min-side 32")),
    Case("image-not-jpeg-png", "prepare_data", "a caption naming a `.gif`",
         lambda t: images(t, edit=caption_rows("image,caption\nimg0.jpg,a\nx.gif,b\n")),
         ("captions.csv, line 3", "'x.gif'", ".jpg, .jpeg or .png")),
    Case("images-folder-missing", "prepare_data", "an images folder that does not exist",
         lambda t: ["images", str(t / "nowhere"), "--captions", str(t / "c.csv"), "--out",
                    str(t / "out")], ("nowhere", "does not exist")),
    Case("captions-missing", "prepare_data", "a captions file that does not exist",
         lambda t: images(t, captions=""), ("missing.csv", "does not exist")),
    Case("captions-no-column", "prepare_data", "a captions CSV without a `caption` column",
         lambda t: images(t, edit=caption_rows("image,text\nimg0.jpg,a\n")),
         ("captions.csv", "'caption'")),
    Case("captions-empty", "prepare_data", "an empty caption in the CSV",
         lambda t: images(t, edit=caption_rows("image,caption\nimg0.jpg,a\nimg1.png, \n")),
         ("captions.csv, line 3", "empty caption")),
    Case("split-twice", "prepare_data", "`--split` with a captions file that has a `split` column",
         lambda t: images(t, "--split", "dev", edit=caption_rows(
             "image,caption,split\nimg0.jpg,a,train\n")), ("split", "drop --split")),
    Case("scan-without-list", "prepare_data", "a SCAN caption `.txt` without `--image-list`",
         lambda t: images(t, edit=scan_files, captions="caps.txt"),
         ("caps.txt", "--image-list")),
    Case("scan-count", "prepare_data", "SCAN captions not a multiple of the image list",
         lambda t: [*images(t, edit=scan_files, captions="caps.txt"), "--image-list",
                    str(t / "imgs" / "list.txt")], ("caps.txt", "3 captions", "2 images")),
    Case("weights-not-state-dict", "prepare_data", "`--weights` a file that is not a state dict",
         lambda t: [*images(t), "--weights", str(t / "imgs" / "img0.jpg")],
         ("--weights", "img0.jpg", "cannot be loaded")),
    Case("grid-too-fine", "prepare_data", "`--grid 4` with `--image-size 64`",
         lambda t: [*images(t), "--grid", "4"], ("--image-size 64", "--grid 4")),
    Case("out-inside-images", "prepare_data", "`--out` inside the images folder",
         lambda t: [*images(t), "--out", str(t / "imgs" / "data")], ("overlaps the source",)),
    Case("min-side-0", "prepare_data", "`--min-side 0`",
         lambda t: [*images(t), "--min-side", "0"], ("--min-side", "at least 1")),
    Case("captions-split-is-a-path", "prepare_data", "a `split` column holding `../victim`",
         lambda t: (victim(t), images(t, edit=caption_rows(
             "image,caption,split\nimg0.jpg,a red square,../victim\n")))[1],
         ("captions.csv, line 2", "split name", "'../victim'")),
    Case("captions-csv-field-too-long", "prepare_data", "a CSV field over the CSV limit",
         lambda t: images(t, edit=caption_rows("image,caption\nimg0.jpg,\"" + "a" * 200_000)),
         ("captions.csv", "not valid CSV")),
]  # fmt: skip


def victim(tmp: Path) -> None:
    """A file where a split named ``../victim`` would put its first shard."""
    (tmp / "victim").mkdir()
    (tmp / "victim" / "part-00000.parquet").write_text("precious")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case: Case, tmp_path: Path):
    args = case.argv(tmp_path)
    before = snapshot(tmp_path)
    r = run_case(case, *args, env={"RAY_ADDRESS": None, **case.env})
    assert_user_error(r, *case.names, lines=case.lines)
    assert snapshot(tmp_path) == before  # nothing deleted, changed or added
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]


def test_an_images_folder_linking_to_itself_is_walked_once(tmp_path: Path, services):
    args = images(tmp_path, edit=self_links)
    r = run_job("prepare_data", *args, timeout=300)  # on the session's Ray head
    assert r.returncode == 0, r.stderr[-3000:]
    from shan.data.reader import read_split

    split = read_split(str(tmp_path / "out"), "train")
    names = sorted(Path(u).name for u in split.image_uris or [])
    assert names == ["img0.jpg", "img1.png", "img2.jpg"]  # each image once, not once a link
