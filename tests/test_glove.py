import numpy as np
import pytest
import torch

from shan.config import ModelConfig
from shan.glove import GloveError, load_glove, save_glove
from shan.model import build_model
from shan.vocab import Vocabulary


def test_round_trip_aligned_to_vocab(tmp_path):
    vocab = Vocabulary(["dog", "cat", "zebra"])
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    save_glove(tmp_path / "g.txt", ["cat", "dog", "elephant", "the"], vecs)
    m = load_glove(tmp_path / "g.txt", vocab, dim=3, seed=1)
    assert m.shape == (len(vocab), 3)
    np.testing.assert_allclose(m[vocab("cat")], vecs[0], atol=1e-6)
    np.testing.assert_allclose(m[vocab("dog")], vecs[1], atol=1e-6)
    assert np.all(m[0] == 0)  # <pad>
    zebra = m[vocab("zebra")]
    assert np.abs(zebra).max() > 0 and np.abs(zebra).max() < np.abs(vecs).max()
    np.testing.assert_array_equal(m, load_glove(tmp_path / "g.txt", vocab, dim=3, seed=1))


def test_model_uses_frozen_glove(tmp_path):
    vocab = Vocabulary(["dog", "cat"])
    save_glove(tmp_path / "g.txt", ["dog", "cat"], np.ones((2, 4), np.float32))
    cfg = ModelConfig(feature_dim=8, d=8, word_dim=4, d_a=4, glove_path=str(tmp_path / "g.txt"))
    model = build_model(cfg, vocab)
    assert torch.equal(model.glove_emb.weight[vocab("dog")], torch.ones(4))
    assert not model.glove_emb.weight.requires_grad


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
