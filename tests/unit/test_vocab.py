import json

import pytest

from shan.vocab import VocabError, Vocabulary, tokenize


def test_tokenize_splits_clitics_and_punctuation():
    assert tokenize("Two dogs' owners can't see.") == [
        "two",
        "dogs",
        "'",
        "owners",
        "ca",
        "n't",
        "see",
        ".",
    ]
    assert tokenize("A T-shirt , red") == ["a", "t-shirt", ",", "red"]


def test_build_keeps_words_seen_min_count_times():
    caps = ["a dog runs"] * 4 + ["a cat sleeps"] * 3
    v = Vocabulary.build(caps, min_count=4)
    assert "dog" in v.word2idx and "runs" in v.word2idx
    assert "cat" not in v.word2idx
    assert v.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert v.encode("a cat runs") == [1, v("a"), 3, v("runs"), 2]


def test_json_round_trip(tmp_path):
    v = Vocabulary(["a", "dog", "'s"])
    path = tmp_path / "vocab.json"
    v.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"}
    assert data["idx2word"]["4"] == "a" and data["idx"] == 7
    assert Vocabulary.load(path) == v


def test_encode_truncates_to_max_words():
    v = Vocabulary(["a", "b"])
    assert v.encode("a b a b", max_words=2) == [1, 4, 5, 2]


@pytest.mark.parametrize(
    "data, match",
    [
        ([1, 2], "expected an object"),
        ({"word2idx": {}}, "non-empty"),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": "5"}}, "not an id"),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 5}}, "without gaps"),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 3}}, "given to"),
        ({"word2idx": {"a": 0, "<start>": 1, "<end>": 2, "<unk>": 3}}, "must be '<pad>'"),
        (
            {
                "word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3},
                "idx2word": {"0": "x"},
            },
            "disagrees",
        ),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx": 9}, "'idx' is 9"),
    ],
)
def test_malformed_json_is_named(tmp_path, data, match):
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(VocabError, match=match) as e:
        Vocabulary.load(path)
    assert "bad_vocab.json" in str(e.value)


def test_not_json_and_missing(tmp_path):
    path = tmp_path / "v.json"
    path.write_text("{not json")
    with pytest.raises(VocabError, match="not valid json"):
        Vocabulary.load(path)
    with pytest.raises(VocabError, match="does not exist"):
        Vocabulary.load(tmp_path / "nope.json")
