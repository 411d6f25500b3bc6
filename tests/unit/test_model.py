"""The model (``shan.model``): padding and masks change nothing, the fast scorer's blocks agree
with the full matrix, every parameter learns, L2L attention is a distribution, bf16 stays
close."""

import pytest
import torch

from shan.model import SCORES, STEPS
from tests.helpers import encode, random_batch, tiny_model


def test_the_scores_are_the_total_then_each_step():
    assert SCORES == ("total", *STEPS) == ("total", "l2l", "g2l", "g2g")
    model = tiny_model()
    with torch.no_grad():
        sims = model.score(*encode(model, *random_batch()))
    assert tuple(sims) == SCORES


def test_padding_words_and_masked_regions_change_nothing():
    model = tiny_model()
    features, counts, tokens, lengths = random_batch()
    with torch.no_grad():
        base = model.score(*encode(model, features, counts, tokens, lengths))
        # more padding, filled with junk: extra regions beyond the counts, extra words
        features2 = torch.cat([features, 50 * torch.randn(3, 4, 12, dtype=features.dtype)], 1)
        tokens2 = torch.cat([tokens, torch.randint(1, 30, (4, 6))], 1)
        # junk in the existing padding too
        for i, c in enumerate(counts):
            features2[i, c:] = torch.randn_like(features2[i, c:]) * 10
        for j, n in enumerate(lengths):
            tokens2[j, n:] = torch.randint(1, 30, (tokens2.shape[1] - n,))
        padded = model.score(*encode(model, features2, counts, tokens2, lengths))
    for key in SCORES:
        torch.testing.assert_close(padded[key], base[key], rtol=0, atol=1e-10)


def test_boolean_mask_equals_counts():
    model = tiny_model()
    features, counts, tokens, lengths = random_batch()
    mask = torch.arange(5)[None, :] < counts[:, None]
    with torch.no_grad():
        a = model.score(*encode(model, features, counts, tokens, lengths))
        b = model.score(*encode(model, features, mask, tokens, lengths))
    torch.testing.assert_close(a["total"], b["total"])


def test_permuting_regions_changes_nothing():
    model = tiny_model()
    features, _, tokens, lengths = random_batch()
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model.score(*encode(model, features, None, tokens, lengths))
        b = model.score(*encode(model, features[:, perm], None, tokens, lengths))
    for key in SCORES:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10)


def test_sub_block_equals_full_matrix_entries():
    model = tiny_model()
    features, counts, tokens, lengths = random_batch(ni=5, nc=6)
    with torch.no_grad():
        im, cap = encode(model, *random_batch(ni=5, nc=6))
        full = model.score(im, cap, block=(2, 4))
        part = model.score(im[1:4], cap[2:5], block=7)
    for key in SCORES:
        torch.testing.assert_close(part[key], full[key][1:4, 2:5], rtol=0, atol=1e-12)


def test_every_parameter_gets_finite_nonzero_gradient():
    from shan.loss import triplet_loss

    model = tiny_model(seed=4).float()
    model.train()
    features, counts, tokens, lengths = random_batch(ni=4, nc=4)
    out = model(features.float(), counts, tokens, lengths, block=2)
    loss = triplet_loss(out["total"], torch.arange(4), margin=10.0, negatives="all")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_checkpointed_blocks_give_the_same_gradients():
    from shan.loss import triplet_loss

    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=5)
        model.train()
        features, counts, tokens, lengths = random_batch(ni=4, nc=4)
        out = model(features, counts, tokens, lengths, block=2, checkpoint=ckpt)
        triplet_loss(out["total"], torch.arange(4), margin=10.0, negatives="all").backward()
        grads.append(model.gate_v.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs_are_named():
    model = tiny_model()
    features, counts, tokens, lengths = random_batch()
    with pytest.raises(ValueError, match="region counts"):
        model.encode_images(features, counts[:2])
    with pytest.raises(ValueError, match="lengths"):
        model.encode_captions(tokens, torch.zeros(4, dtype=torch.long))


def test_bf16_autocast_scores_are_finite_and_close():
    model = tiny_model().float()
    features, counts, tokens, lengths = random_batch()
    with torch.no_grad():
        ref = model.score(*encode(model, features.float(), counts, tokens, lengths))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.score(*encode(model, features.float(), counts, tokens, lengths))
    for key in SCORES:
        assert torch.isfinite(low[key]).all()
        assert (low[key].float() - ref[key]).abs().max() < 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features.float(), counts, tokens, lengths)
    out["total"].float().sum().backward()


def test_l2l_attention_is_a_distribution_over_real_words_and_regions():
    model = tiny_model()
    features, counts, tokens, lengths = random_batch()  # 3 images (k=5), 4 captions (n=7)
    with torch.no_grad():
        im, cap = encode(model, features, counts, tokens, lengths)
        alpha, beta = model.l2l_attention(im, cap)
    assert alpha.shape == (3 * 5, 4, 7) and beta.shape == (3, 5, 4 * 7)
    alpha, beta = alpha.view(3, 5, 4, 7), beta.view(3, 5, 4, 7)
    for i, k in enumerate(counts.tolist()):
        for j, n in enumerate(lengths.tolist()):
            a, b = alpha[i, :k, j], beta[i, :, j, :n]  # real regions' rows, real words' columns
            torch.testing.assert_close(a[:, :n].sum(-1), torch.ones(k, dtype=a.dtype))
            assert (a[:, n:] == 0).all()  # no weight on padding words
            torch.testing.assert_close(b[:k].sum(0), torch.ones(n, dtype=b.dtype))
            assert (b[k:] == 0).all()  # no weight on masked regions
