"""GloVe vectors (``shan.glove``): aligned to the vocabulary, a word the file lacks gets a row
of its own (seeded by the word), malformed lines are named, and the model keeps the rows it is
given, frozen or fine-tuned."""

import numpy as np
import pytest
import torch

from shan.config import ModelConfig
from shan.glove import GloveError, load_glove, oov_row, save_glove
from shan.model import SHAN, build_model
from shan.vocab import Vocabulary


def test_round_trip_aligned_to_vocab(tmp_path):
    vocab = Vocabulary(["dog", "cat", "zebra"])
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    save_glove(tmp_path / "g.txt", ["cat", "dog", "elephant", "the"], vecs)
    m = load_glove(tmp_path / "g.txt", vocab, dim=3)
    assert m.shape == (len(vocab), 3) and m.dtype == np.float32
    np.testing.assert_allclose(m[vocab("cat")], vecs[0], atol=1e-6)
    np.testing.assert_allclose(m[vocab("dog")], vecs[1], atol=1e-6)
    assert np.all(m[0] == 0)  # <pad>
    zebra = m[vocab("zebra")]
    assert np.abs(zebra).max() > 0 and np.abs(zebra).max() < np.abs(vecs).max()
    np.testing.assert_array_equal(m, load_glove(tmp_path / "g.txt", vocab, dim=3))


def test_a_missing_words_row_depends_on_the_word_only(tmp_path):
    """The same row for "zebra" in two loads and in two vocabularies that order their words
    differently (and hold other missing words): seeded by the word, not by its position."""
    save_glove(tmp_path / "g.txt", ["cat", "dog"], np.array([[1, 2, 3], [3, 2, 1]], np.float32))
    v1 = Vocabulary(["dog", "cat", "zebra"])
    v2 = Vocabulary(["yak", "zebra", "cat", "gnu"])
    m1 = load_glove(tmp_path / "g.txt", v1, dim=3)
    m2 = load_glove(tmp_path / "g.txt", v2, dim=3)
    np.testing.assert_array_equal(m1[v1("zebra")], m2[v2("zebra")])
    np.testing.assert_array_equal(m1, load_glove(tmp_path / "g.txt", v1, dim=3))
    assert not np.array_equal(m2[v2("yak")], m2[v2("gnu")])  # each word its own row
    np.testing.assert_array_equal(m2[v2("cat")], m1[v1("cat")])  # found rows as in the file
    # the row is oov_row's: N(0, (0.1 std)^2) with std that of the found rows
    std = float(np.array([[1, 2, 3], [3, 2, 1]], np.float32).std())
    np.testing.assert_allclose(m1[v1("zebra")], oov_row("zebra", 3, 0.1 * std), rtol=1e-6)


def test_a_word_holding_spaces_is_read_up_to_its_last_dim_values(tmp_path):
    """glove.840B.300d.txt has lines like ``. . . 0.1 0.2 ...``: the word is what comes
    before the last ``dim`` values."""
    (tmp_path / "g.txt").write_text("dog 1 2 3\n. . . 4 5 6\nat&t corp 7 8 9\ncat 0.5 0.5 0.5\n")
    vocab = Vocabulary(["dog", "cat", ". . .", "at&t corp"])
    m = load_glove(tmp_path / "g.txt", vocab, dim=3)
    np.testing.assert_array_equal(m[vocab(". . .")], [4, 5, 6])
    np.testing.assert_array_equal(m[vocab("at&t corp")], [7, 8, 9])
    np.testing.assert_array_equal(m[vocab("cat")], [0.5, 0.5, 0.5])
    # a word with spaces that the vocabulary lacks is skipped like any other line
    dog = Vocabulary(["dog"])
    np.testing.assert_array_equal(load_glove(tmp_path / "g.txt", dog, 3)[dog("dog")], [1, 2, 3])


def test_model_uses_frozen_glove(tmp_path):
    vocab = Vocabulary(["dog", "cat"])
    save_glove(tmp_path / "g.txt", ["dog", "cat"], np.ones((2, 4), np.float32))
    cfg = ModelConfig(feature_dim=8, d=8, word_dim=4, d_a=4, glove_path=str(tmp_path / "g.txt"))
    model = build_model(cfg, vocab)
    assert torch.equal(model.glove_emb.weight[vocab("dog")], torch.ones(4))
    assert not model.glove_emb.weight.requires_grad


def test_fine_tuned_glove_keeps_the_given_rows_at_initialisation(tmp_path):
    """``freeze_glove: false``: the rows are trained from GloVe's values, not re-drawn (they
    were overwritten by the uniform initialisation once)."""
    vocab = Vocabulary(["dog", "cat"])
    vecs = np.array([[0.5, -0.25, 2.0, 1.0], [-1.5, 0.75, 0.0, 3.0]], np.float32)
    save_glove(tmp_path / "g.txt", ["dog", "cat"], vecs)
    cfg = ModelConfig(feature_dim=8, d=8, word_dim=4, d_a=4, glove_path=str(tmp_path / "g.txt"),
                      freeze_glove=False)  # fmt: skip
    expected = torch.from_numpy(load_glove(tmp_path / "g.txt", vocab, 4))
    for model in (build_model(cfg, vocab), SHAN(cfg, len(vocab), glove=expected.clone())):
        assert model.glove_emb.weight.requires_grad
        torch.testing.assert_close(model.glove_emb.weight.detach(), expected, rtol=0, atol=0)
        assert torch.equal(model.glove_emb.weight[vocab("dog")].detach(), torch.from_numpy(vecs[0]))


@pytest.mark.parametrize(
    "text, match",
    [
        ("dog 1 2 3\ncat 1 2\n", "line 2: expected a word and 3 values, got 2"),
        ("dog 1 x 3\n", "line 1: a value is not a number"),
        ("dog 1 nan 3\n", "line 1: non-finite"),
    ],
)
def test_malformed_lines_are_named(tmp_path, text, match):
    (tmp_path / "g.txt").write_text(text)
    with pytest.raises(GloveError, match=match):
        load_glove(tmp_path / "g.txt", Vocabulary(["dog", "cat"]), dim=3)


def test_missing_file(tmp_path):
    with pytest.raises(GloveError, match="does not exist"):
        load_glove(tmp_path / "none.txt", Vocabulary([]), dim=3)
