"""Caption files (``shan.data.captions``): CSV, JSON lines and SCAN text with an image list;
a split column and ``--split`` are not given together."""

from __future__ import annotations

from pathlib import Path

import pytest

from shan.data.captions import read_captions
from shan.data.format import DataError


def test_caption_formats(tmp_path: Path):
    (tmp_path / "c.jsonl").write_text('{"image": "a.jpg", "caption": "x y"}\n'
                                      '{"image": "b.png", "caption": "z"}\n'
                                      '{"image": "a.jpg", "caption": "w"}\n')  # fmt: skip
    got = read_captions(str(tmp_path / "c.jsonl"), split="dev")
    assert list(got) == ["dev"] and got["dev"]["a.jpg"].captions == ["x y", "w"]
    (tmp_path / "caps.txt").write_text("one\ntwo\nthree\nfour\n")
    (tmp_path / "list.txt").write_text("p.jpg\nq.jpg\n")
    got = read_captions(str(tmp_path / "caps.txt"), image_list=str(tmp_path / "list.txt"))
    assert {k: v.captions for k, v in got["train"].items()} == {
        "p.jpg": ["one", "two"],
        "q.jpg": ["three", "four"],
    }
    (tmp_path / "s.csv").write_text("image,caption,split\na.jpg,x,train\nb.jpg,y,test\n")
    assert list(read_captions(str(tmp_path / "s.csv"))) == ["train", "test"]
    with pytest.raises(DataError, match="drop --split"):
        read_captions(str(tmp_path / "s.csv"), split="train")
