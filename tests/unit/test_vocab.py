import json
import subprocess
import sys
from pathlib import Path

import pytest

from shan.vocab import VocabError, Vocabulary, tokenize

ROOT = Path(__file__).resolve().parents[2]


# Each expected list is what SCAN's tokenizer, nltk.word_tokenize(caption.lower()) with Punkt's
# English model, gives (checked by hand; where a period inside a caption matters, against the
# model's abbreviation list: "mr", "st", "u.s", "d.c", "p.m", "j.r" are in it; "etc", "t.v",
# "e.g", "i.e" are not, so a period after them ends a sentence).
SCAN_TOKENS = [
    ("The screen is 3.5 inches wide", ["the", "screen", "is", "3.5", "inches", "wide"]),
    ("1,000 people, 2,500.75 dollars", ["1,000", "people", ",", "2,500.75", "dollars"]),
    ("It costs $5 or $3.50.", ["it", "costs", "$", "5", "or", "$", "3.50", "."]),
    (
        "Mr. Smith walks on St. Mark's Place.",
        ["mr.", "smith", "walks", "on", "st.", "mark", "'s", "place", "."],
    ),
    (
        "A U.S. flag in Washington D.C. today",
        ["a", "u.s.", "flag", "in", "washington", "d.c.", "today"],
    ),
    (
        "Dr. Jones at 5 p.m. on Main St.",
        ["dr.", "jones", "at", "5", "p.m.", "on", "main", "st", "."],
    ),
    (
        "Hats, scarves, etc. are sold.",
        ["hats", ",", "scarves", ",", "etc", ".", "are", "sold", "."],
    ),
    (
        "A t.v. is on. J.R. Tolkien's boat",
        ["a", "t.v", ".", "is", "on", ".", "j.r.", "tolkien", "'s", "boat"],
    ),
    ("the e.g. case i.e. this", ["the", "e.g", ".", "case", "i.e", ".", "this"]),
    (
        "A wall with the words E.S.E. Electronics painted on it. A U.S.A. flag",
        ["a", "wall", "with", "the", "words", "e.s.e.", "electronics", "painted", "on", "it"]
        + [".", "a", "u.s.a.", "flag"],
    ),
    (
        "A sign that says E.S.E. Electronics .",
        ["a", "sign", "that", "says", "e.s.e.", "electronics", "."],
    ),
    ("A dog runs. It is brown.", ["a", "dog", "runs", ".", "it", "is", "brown", "."]),
    (
        "a man (left.) and a woman.",
        ["a", "man", "(", "left", ".", ")", "and", "a", "woman", "."],
    ),
    (
        "A sign says \"stop\" and 'go' here",
        ["a", "sign", "says", "``", "stop", "''", "and", "'", "go", "'", "here"],
    ),
    (
        "A well-known T-shirt -- blue - red",
        ["a", "well-known", "t-shirt", "--", "blue", "-", "red"],
    ),
    (
        "The dog's toy isn't from the '90s",
        ["the", "dog", "'s", "toy", "is", "n't", "from", "the", "'", "90s"],
    ),
    ("Two dogs' owners can't see.", ["two", "dogs", "'", "owners", "ca", "n't", "see", "."]),
    (
        "I cannot, won't; gonna (maybe) [ok] 50% #1 @home & more",
        ["i", "can", "not", ",", "wo", "n't", ";", "gon", "na", "(", "maybe", ")", "[", "ok"]
        + ["]", "50", "%", "#", "1", "@", "home", "&", "more"],
    ),
    (
        "Café crème, naïve ÉCOLE 🐶 东京 “hello” ‘hi’ don’t",
        ["café", "crème", ",", "naïve", "école", "🐶", "东京", "“", "hello", "”", "‘", "hi"]
        + ["’", "don", "’", "t"],
    ),
    ("Wait... what?! Really?", ["wait", "...", "what", "?", "!", "really", "?"]),
    ("A view of the ocean..", ["a", "view", "of", "the", "ocean", ".."]),
    ("a cat . .", ["a", "cat", ".", "."]),
    ("  A\tdog   runs  \n", ["a", "dog", "runs"]),
    ("", []),
    (" \t ", []),
]


@pytest.mark.parametrize(("caption", "tokens"), SCAN_TOKENS, ids=[c for c, _ in SCAN_TOKENS])
def test_tokenize_gives_scan_tokens(caption, tokens):
    assert tokenize(caption) == tokens


def test_the_old_regex_tokenizer_bad_cases_now_give_scan_tokens():
    # the regex tokenizer before NLTK gave '3', '.', '5' / '1', ',', '000' / 'mr', '.'
    assert tokenize("A 3.5 ton truck") == ["a", "3.5", "ton", "truck"]
    assert tokenize("1,000 birds") == ["1,000", "birds"]
    assert tokenize("Mr. Bean") == ["mr.", "bean"]


def test_importing_the_vocabulary_does_not_import_nltk():
    # ``import nltk`` takes seconds (it imports scipy and scikit-learn when present)
    code = "import sys, shan.vocab; assert 'nltk' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


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


def test_modules_hidden_while_nltk_loads_import_again_afterwards():
    import sys

    from shan.vocab import _without

    name = "colorsys"  # a standard module nothing here imports
    sys.modules.pop(name, None)
    with _without(name, "json"), pytest.raises(ImportError):
        __import__(name)
    assert "json" in sys.modules and sys.modules["json"] is not None  # imported ones stay
    assert __import__(name).__name__ == name
