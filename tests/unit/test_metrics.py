import numpy as np
import pytest

from shan.metrics import (
    fold_metrics,
    i2t_ranks,
    recall_metrics,
    sparse_ranks,
    sparse_recall_metrics,
    t2i_ranks,
)


def naive_i2t(sims, cap_img):
    ranks = []
    for i in range(sims.shape[0]):
        gts = [c for c in range(sims.shape[1]) if cap_img[c] == i]
        best = max(sims[i, c] for c in gts)
        ranks.append(sum(1 for c in range(sims.shape[1]) if c not in gts and sims[i, c] >= best))
    return np.array(ranks)


def naive_t2i(sims, cap_img):
    out = []
    for c in range(sims.shape[1]):
        g = cap_img[c]
        out.append(sum(1 for i in range(sims.shape[0]) if i != g and sims[i, c] >= sims[g, c]))
    return np.array(out)


def test_hand_built_matrix():
    # 2 images; captions 0,1 belong to image 0, caption 2 to image 1
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]], dtype=np.float32)
    cap_img = np.array([0, 0, 1])
    # i2t: image 0 best gt 0.9 -> rank 0 ; image 1 gt 0.7, caption 1 (0.8) above -> rank 1
    assert i2t_ranks(sims, cap_img).tolist() == [0, 1]
    # t2i: c0 -> image0 0.9 top -> 0 ; c1 -> image0 0.1 < 0.8 -> 1 ; c2 -> image1 0.7 top -> 0
    assert t2i_ranks(sims, cap_img).tolist() == [0, 1, 0]
    m = recall_metrics(sims, cap_img)
    assert m["i2t_r1"] == pytest.approx(50.0)
    assert m["t2i_r1"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == 100.0 and m["t2i_r10"] == 100.0
    assert m["rsum"] == pytest.approx(50 + 100 + 100 + 200 / 3 + 100 + 100)
    assert m["i2t_medr"] == 1.0  # floor(median([0, 1])) + 1
    assert m["t2i_meanr"] == pytest.approx(1 + 1 / 3)


def test_ties_are_pessimistic():
    sims = np.array([[0.5, 0.5], [0.5, 0.5]], dtype=np.float32)
    cap_img = np.array([0, 1])
    assert i2t_ranks(sims, cap_img).tolist() == [1, 1]
    assert t2i_ranks(sims, cap_img).tolist() == [1, 1]
    assert recall_metrics(sims, cap_img)["i2t_r1"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_chunked_equals_naive_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    ni = 7
    cap_img = np.concatenate([np.arange(ni), rng.integers(0, ni, size=9)])
    rng.shuffle(cap_img)
    sims = rng.integers(0, 5, size=(ni, cap_img.size)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(i2t_ranks(sims, cap_img, chunk=2), naive_i2t(sims, cap_img))
    np.testing.assert_array_equal(t2i_ranks(sims, cap_img, chunk=3), naive_t2i(sims, cap_img))


def test_five_folds_average_the_fold_blocks():
    rng = np.random.default_rng(0)
    ni, per = 10, 2
    cap_img = np.repeat(np.arange(ni), per)
    sims = rng.normal(size=(ni, ni * per)).astype(np.float32)
    got = fold_metrics(sims, cap_img, folds=5, fold_size=2)
    folds = [
        recall_metrics(
            sims[2 * f : 2 * f + 2, 4 * f : 4 * f + 4], cap_img[4 * f : 4 * f + 4] - 2 * f
        )
        for f in range(5)
    ]
    assert got["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    with pytest.raises(ValueError, match="folds"):
        fold_metrics(sims, cap_img, folds=5, fold_size=3)


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="image row 1 has no caption"):
        recall_metrics(np.zeros((2, 2), np.float32), np.array([0, 0]))


def _all_candidates(sims: np.ndarray) -> tuple[tuple, tuple]:
    """The dense matrix as a rerank whose candidates are every row, in a shuffled order."""
    rng = np.random.default_rng(1)
    ni, nc = sims.shape
    tc = np.stack([rng.permutation(ni) for _ in range(nc)])  # (Nc, Ni)
    ic = np.stack([rng.permutation(nc) for _ in range(ni)])  # (Ni, Nc)
    ts = sims.T[np.arange(nc)[:, None], tc]
    is_ = sims[np.arange(ni)[:, None], ic]
    return (tc, ts), (ic, is_)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_recall_with_every_candidate_equals_the_dense_recall(seed):
    rng = np.random.default_rng(seed)
    ni = 40
    caption_image = np.repeat(np.arange(ni), 5)
    sims = rng.normal(size=(ni, 5 * ni)).astype(np.float32)
    sims[caption_image, np.arange(5 * ni)] += 1.5  # some signal: recalls between 0 and 100
    sims[3, 7] = sims[3, 0]  # and a tie, counted above the ground truth by both
    t2i, i2t = _all_candidates(sims)
    assert sparse_recall_metrics(t2i, i2t, caption_image) == recall_metrics(sims, caption_image)


def test_sparse_recall_a_ground_truth_outside_the_candidates_is_a_miss():
    caption_image = np.array([0, 0, 1, 1])
    # captions 0..3: candidates are images; caption 2's image (1) is not among its candidates
    tc = np.array([[0, 1], [1, 0], [0, 0], [1, 0]])
    ts = np.array([[0.9, 0.1], [0.8, 0.7], [0.5, 0.4], [0.3, 0.6]], dtype=np.float32)
    ic = np.array([[2, 0], [3, 0]])  # image 0's candidates: captions 2 (not its), 0 (its)
    is_ = np.array([[0.9, 0.5], [0.2, 0.1]], dtype=np.float32)
    ranks_t = sparse_ranks(tc, ts, tc == caption_image[:, None])
    assert ranks_t.tolist() == [0, 1, 2, 1]  # caption 2: a miss, ranked K = 2
    ranks_i = sparse_ranks(ic, is_, caption_image[ic] == np.arange(2)[:, None])
    assert ranks_i.tolist() == [1, 0]
    m = sparse_recall_metrics((tc, ts), (ic, is_), caption_image)
    assert m["t2i_r1"] == 25.0 and m["i2t_r1"] == 50.0
    assert m["t2i_r10"] == 75.0 and m["t2i_meanr"] == 2.0  # the miss: ranked K + 1 = 3


def test_sparse_recall_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        sparse_ranks(np.zeros((2, 3), int), np.zeros((2, 2)), np.zeros((2, 3), bool))
