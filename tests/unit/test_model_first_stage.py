"""The first stage of retrieve-then-rerank (``shan.model.FirstStage``, ``shan.loss``'s
``first_stage_loss``): its loss, that training it beside SHAN leaves SHAN's steps exactly as
they are without it, and that checkpoints (and the logged MLflow model, which is the checkpoint
folder) keep the head."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from shan.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    load_model,
    require_first_stage,
    save_checkpoint,
)
from shan.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig
from shan.errors import CheckpointError
from shan.loss import first_stage_loss
from shan.model import SHAN, FirstStage, l2norm
from shan.scoring import caption_vectors, image_vectors, score_matrix
from shan.train.worker import LoopSettings, Meter, epoch_batches, make_worker, train_epoch
from shan.vocab import Vocabulary
from tests.helpers import WORDS

F = 12  # feature size
VOCAB = Vocabulary(WORDS)
HEAD = "first_stage."


def unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return l2norm(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)))


# -- the loss -------------------------------------------------------------------------------------
def test_aligned_pairs_cost_less_than_shuffled_ones():
    images = unit(8)
    captions = l2norm(images + 0.1 * unit(8, seed=1))  # each caption near its own image
    ids = torch.arange(8)
    aligned = first_stage_loss(images, captions, ids, 0.05)
    shuffled = first_stage_loss(images, captions[torch.roll(ids, 1)], ids, 0.05)
    assert aligned.shape == () and aligned < 0.1 < shuffled


def test_every_caption_of_an_image_is_a_positive():
    """Two captions per image, each equal to its image's vector: with the image ids the other
    row of the same image is a positive (loss near 0); counted as a negative it would cost
    about log 2 in each direction."""
    images = unit(3).repeat_interleave(2, 0)  # (6, D): rows 2i and 2i+1 are image i
    ids = torch.arange(3).repeat_interleave(2)
    shared = first_stage_loss(images, images.clone(), ids, 0.01)
    apart = first_stage_loss(images, images.clone(), torch.arange(6), 0.01)
    assert shared < 1e-3
    assert apart == pytest.approx(np.log(2), abs=1e-3)


def test_the_loss_is_finite_and_float32_from_bf16_vectors():
    images, captions = unit(16, 32), unit(16, 32, seed=1)
    ids = torch.arange(16) // 2
    want = first_stage_loss(images, captions, ids, 0.05)
    got = first_stage_loss(images.bfloat16(), captions.bfloat16(), ids, 0.05)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=0.02)


# -- training: SHAN's steps are the same with or without the head ------------------------------
class Shard:
    """A Ray Data shard of ``images`` rows (two captions each) in chunks of 3."""

    def __init__(self, images: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rows = {
            "image_id": np.arange(images),
            "features": rng.normal(size=(images, 5, F)).astype(np.float32),
            "num_regions": rng.integers(2, 6, size=images).astype(np.int32),
            "tokens": [
                [
                    [1, *rng.integers(4, len(WORDS), size=int(rng.integers(2, 6))).tolist(), 2]
                    for _ in range(2)
                ]
                for _ in range(images)
            ],
        }

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        n = len(self.rows["image_id"])
        for i in range(0, n, 3):
            yield {k: v[i : i + 3] for k, v in self.rows.items()}


def config(first_stage_dim: int, grad_clip: float = 0.05) -> Config:
    """A tiny recipe whose gradient clip acts at every step (0.05), so that a head clipped with
    SHAN's weights would change SHAN's steps."""
    return Config(
        name="unit",
        seed=3,
        model=ModelConfig(feature_dim=F, d=16, word_dim=6, d_a=8, first_stage_dim=first_stage_dim),
        optim=OptimConfig(epochs=1, batch_size=4, lr=1e-2, warmup_steps=0, grad_clip=grad_clip),
        data=DataConfig(shuffle_buffer=0),
    ).validate()


def trained(first_stage_dim: int, grad_clip: float = 0.05) -> tuple[dict, dict, Meter]:
    """(weights before, weights after, the epoch's meter) of one epoch of the worker's own loop
    (8 steps)."""
    settings = LoopSettings(
        config=config(first_stage_dim, grad_clip),
        vocab=VOCAB,
        glove=None,
        mlflow_uri="",
        mlflow_run_id="",
        fit_token="",
        data_root="",
        torch_threads=1,
        train_captions=0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = make_worker(settings, torch.device("cpu"), rank=0, world=1)
        w.logger = None  # no MLflow
        before = {k: v.clone() for k, v in w.core.state_dict().items()}
        meter = train_epoch(w, epoch_batches(w, Shard()), steps_hint=8)
        assert w.state.step == 8
    finally:
        torch.set_num_threads(threads)
    return before, {k: v.clone() for k, v in w.core.state_dict().items()}, meter


@pytest.mark.parametrize("grad_clip", [0.05, 2.0])
def test_the_head_leaves_every_shan_step_bitwise_unchanged(grad_clip):
    """The worker's steps (forward, backward, gradient clip, Adam) with a first stage give
    SHAN's weights bit for bit what they give without it, with the clip acting (0.05) or not;
    the head's own weights do train."""
    start0, end0, meter0 = trained(0, grad_clip)
    start8, end8, meter8 = trained(8, grad_clip)
    head = {k for k in end8 if k.startswith(HEAD)}
    assert head and set(end8) - head == set(end0)
    for k in end0:
        assert torch.equal(start8[k], start0[k]), f"{k}: initial weights differ"
        assert torch.equal(end8[k], end0[k]), f"{k}: trained weights differ"
    assert any(not torch.equal(end0[k], start0[k]) for k in end0)  # SHAN trained at all
    assert all(not torch.equal(end8[k], start8[k]) for k in head), "a head weight did not train"
    # train/loss stays SHAN's own; the head's is logged apart (train/first_stage_loss)
    assert meter8.losses == pytest.approx(meter0.losses, rel=1e-5)
    assert meter0.first_stage == [] and "train/epoch_first_stage_loss" not in meter0.stats()
    assert len(meter8.first_stage) == 8 and all(0 < x < 10 for x in meter8.first_stage)
    assert meter8.stats()["train/epoch_first_stage_loss"] == pytest.approx(
        np.mean(meter8.first_stage)
    )


def test_shans_initial_weights_and_the_random_stream_do_not_depend_on_the_head():
    weights, draws = [], []
    for dim in (0, 8):
        torch.manual_seed(11)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SHAN(config(dim).model, len(VOCAB))
        weights.append(model.state_dict())
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])
    assert all(torch.equal(weights[1][k], v) for k, v in weights[0].items())
    assert any(k.startswith(HEAD) for k in weights[1])


# -- checkpoints --------------------------------------------------------------------------------
def split(images: int = 5, seed: int = 2):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(images, 4, F)).astype(np.float32)
    regions = rng.integers(1, 5, size=images)
    tokens = [[1, *rng.integers(4, len(WORDS), size=3).tolist(), 2] for _ in range(2 * images)]
    return features, regions, tokens


def saved_model(folder, first_stage_dim: int) -> tuple[SHAN, Checkpoint]:
    torch.manual_seed(4)
    cfg = config(first_stage_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(VOCAB)).eval()
    ckpt = Checkpoint(weights=model.state_dict(), config=cfg, vocab=VOCAB)
    save_checkpoint(folder, ckpt)
    return model, ckpt


def test_a_checkpoint_keeps_the_head_and_its_vectors(tmp_path):
    model, _ = saved_model(tmp_path / "ckpt", 8)
    back = load_model(tmp_path / "ckpt").model
    keys = [k for k in back.state_dict() if k.startswith(HEAD)]
    assert keys and all(torch.equal(back.state_dict()[k], model.state_dict()[k]) for k in keys)
    require_first_stage(back, "ckpt")  # nothing to say
    features, regions, tokens = split()
    cpu = torch.device("cpu")
    a = image_vectors(model, features, regions, cpu), caption_vectors(model, tokens, cpu)
    b = image_vectors(back, features, regions, cpu), caption_vectors(back, tokens, cpu)
    assert a[0].shape == (5, 8) and a[1].shape == (10, 8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(np.linalg.norm(a[0], axis=1), 1.0, rtol=1e-5)


def test_an_old_checkpoint_scores_and_says_in_one_line_that_it_has_no_head(tmp_path):
    """A checkpoint saved before there was a first stage (no ``first_stage_dim`` in its
    config.yaml) loads and scores exhaustively; an index or a rerank is refused in one line."""
    model, _ = saved_model(tmp_path / "old", 0)
    config_file = tmp_path / "old" / CONFIG_FILE
    text = config_file.read_text()
    assert "first_stage_dim: 0\n" in text
    config_file.write_text(text.replace("  first_stage_dim: 0\n", ""))
    loaded = load_model(tmp_path / "old")
    assert loaded.model.first_stage is None and loaded.config.model.first_stage_dim == 0
    features, regions, tokens = split()
    cpu = torch.device("cpu")
    want = score_matrix(model, features, regions, tokens, cpu)["total"]
    got = score_matrix(loaded.model, features, regions, tokens, cpu)["total"]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(CheckpointError) as e:
        require_first_stage(loaded.model, "runs:/abc/model")
    message = str(e.value)
    assert "\n" not in message and message.startswith("model runs:/abc/model has no first-stage")
    with pytest.raises(ValueError, match="no first stage"):
        image_vectors(loaded.model, features, regions, cpu)


# The logged MLflow model is this checkpoint folder, byte for byte (pyfunc.log_model; the bytes
# are compared in test_tracking_pyfunc.py's test_resolve_the_mlflow_model_layout): it holds the
# head whenever model.pt does (test_a_checkpoint_keeps_the_head_and_its_vectors).


# -- the head's pool ------------------------------------------------------------------------------
def test_the_max_head_keeps_each_features_largest_fragment_and_ignores_padding():
    """pool "max": each side's vector is the element-wise max of its projected fragments over
    the kept ones, unit length; a padded fragment, however large, changes nothing."""
    torch.manual_seed(0)
    head = FirstStage(6, 4, 5)  # the default pool: max
    assert head.pool == "max" and not hasattr(head, "pool_v")
    v = torch.randn(2, 3, 6)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    want = l2norm(head.head_v(v[0, :2]).max(0).values)
    np.testing.assert_allclose(head.images(v, mask)[0].detach(), want.detach(), rtol=1e-6)
    v2 = v.clone()
    v2[0, 2] = 1e3  # the padded region
    assert torch.equal(head.images(v2, mask)[0], head.images(v, mask)[0])
    t = torch.randn(2, 4, 6)
    t_mask = torch.tensor([[True, False, False, False], [True] * 4])
    one = l2norm(head.head_t(t[0, 0]))  # one word: its projection
    np.testing.assert_allclose(head.captions(t, t_mask)[0].detach(), one.detach(), rtol=1e-6)
    with pytest.raises(ValueError, match="pool must be one of"):
        FirstStage(6, 4, 5, "mean")


def test_a_checkpoint_from_before_the_pool_choice_loads_its_attention_head(tmp_path):
    """A head saved without ``first_stage_pool`` in config.yaml was the attention pool's: it
    loads as such, with the same vectors; a new config's default is "max"."""
    assert ModelConfig().first_stage_pool == "max"
    torch.manual_seed(4)
    cfg = config(8)
    cfg.model.first_stage_pool = "attention"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(VOCAB)).eval()
    save_checkpoint(tmp_path / "old", Checkpoint(model.state_dict(), cfg, VOCAB))
    config_file = tmp_path / "old" / CONFIG_FILE
    text = config_file.read_text()
    assert "  first_stage_pool: attention\n" in text
    config_file.write_text(text.replace("  first_stage_pool: attention\n", ""))
    back = load_model(tmp_path / "old")
    assert back.config.model.first_stage_pool == "attention"
    features, regions, _ = split()
    cpu = torch.device("cpu")
    np.testing.assert_array_equal(
        image_vectors(back.model, features, regions, cpu),
        image_vectors(model, features, regions, cpu),
    )


def test_a_bad_pool_is_a_config_problem():
    with pytest.raises(ConfigError, match="model.first_stage_pool"):
        Config(model=ModelConfig(first_stage_pool="mean")).validate()
