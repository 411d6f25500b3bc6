"""Checkpoints: a save/load round trip, the scoring loader, and damaged files named in the error."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import yaml

from shan.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    VOCAB_FILE,
    Checkpoint,
    LoadedModel,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from shan.config import Config
from shan.errors import CheckpointError
from shan.model import SCORES, SHAN
from shan.vocab import Vocabulary
from tests.helpers import WORDS, mounted_tmpfs, random_batch, tiny_config

VOCAB = Vocabulary(WORDS)


def trained_checkpoint() -> tuple[SHAN, Checkpoint]:
    """A tiny model after two Adam steps (so the optimizer has state), and its checkpoint."""
    torch.manual_seed(0)
    cfg = Config(name="ckpt-test", model=tiny_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(VOCAB))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    features, counts, tokens, lengths = random_batch(ni=4, nc=4, vocab_size=len(VOCAB))
    for _ in range(2):
        loss = model(features.float(), counts, tokens, lengths)["total"].diagonal().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ckpt = Checkpoint(
        weights=model.state_dict(),
        config=cfg,
        vocab=VOCAB,
        optimizer=opt.state_dict(),
        epoch=3,
        step=17,
        best_rsum=412.5,
        metrics={"val/rsum": 412.5, "val/i2t_r1": 40.0},
    )
    return model, ckpt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, ckpt = trained_checkpoint()
    folder = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run" / "best", ckpt)
    return model, ckpt, folder


def scores(model: SHAN) -> dict[str, torch.Tensor]:
    features, counts, tokens, lengths = random_batch(ni=3, nc=5, seed=7, vocab_size=len(VOCAB))
    with torch.no_grad():
        return model(features.float(), counts, tokens, lengths)


def test_round_trip_keeps_everything(saved):
    _, ckpt, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_FILE, CONFIG_FILE, VOCAB_FILE])
    back = load_checkpoint(folder)
    assert back.weights.keys() == ckpt.weights.keys()
    for k, v in ckpt.weights.items():
        assert torch.equal(back.weights[k], v), k
    assert back.config == ckpt.config
    assert back.vocab == ckpt.vocab and len(back.vocab) == len(VOCAB)
    assert (back.epoch, back.step, back.best_rsum) == (3, 17, 412.5)
    assert back.metrics == ckpt.metrics
    # Adam's state: a step count and two moments per parameter, equal tensor by tensor
    assert back.optimizer is not None
    assert back.optimizer["param_groups"] == ckpt.optimizer["param_groups"]
    state, want = back.optimizer["state"], ckpt.optimizer["state"]
    assert state.keys() == want.keys() and len(state) > 0
    for i in want:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][k], want[i][k]), (i, k)


def test_a_resumed_optimizer_takes_the_state(saved):
    model, ckpt, folder = saved
    back = load_checkpoint(folder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(back.optimizer)
    first = next(iter(opt.state.values()))
    assert float(first["step"]) == 2.0


def test_weights_only_drops_the_optimizer_and_nothing_else(saved):
    _, ckpt, _ = saved
    light = ckpt.weights_only()
    assert light.optimizer is None and ckpt.optimizer is not None  # the original is untouched
    assert light.weights is ckpt.weights and light.config is ckpt.config
    assert (light.epoch, light.step, light.best_rsum) == (ckpt.epoch, ckpt.step, ckpt.best_rsum)


def test_a_weights_only_copy_saves_without_optimizer(saved, tmp_path):
    _, ckpt, _ = saved
    back = load_checkpoint(save_checkpoint(tmp_path / "light", ckpt.weights_only()))
    assert back.optimizer is None and back.step == 17
    payload = torch.load(tmp_path / "light" / MODEL_FILE, weights_only=True)
    assert "optimizer" not in payload


def test_defaults_of_a_minimal_payload(saved, tmp_path):
    """A model.pt holding only the weights: progress at its defaults."""
    _, ckpt, _ = saved
    folder = save_checkpoint(tmp_path / "min", ckpt)
    torch.save({"model": ckpt.weights}, folder / MODEL_FILE)
    back = load_checkpoint(folder)
    assert (back.epoch, back.step, back.metrics, back.optimizer) == (0, 0, {}, None)
    assert back.best_rsum == -math.inf


def test_load_model_scores_like_the_original(saved):
    model, _, folder = saved
    loaded = load_model(folder)
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training  # eval mode
    assert loaded.config.model == model.cfg and loaded.vocab == VOCAB
    want, got = scores(model), scores(loaded.model)
    for k in SCORES:
        assert torch.equal(got[k], want[k]), k


def test_load_model_does_not_need_the_glove_file(saved, tmp_path):
    """The GloVe rows are in the weights: a checkpoint whose config names a GloVe file that is
    gone still loads."""
    _, ckpt, _ = saved
    cfg = Config(name="ckpt-test", model=tiny_config(glove_path=str(tmp_path / "gone.txt")))
    folder = save_checkpoint(tmp_path / "g", Checkpoint(ckpt.weights, cfg, VOCAB))
    assert load_model(folder).config.model.glove_path.endswith("gone.txt")


# -- damaged checkpoints: CheckpointError naming the file -----------------------------------------
def copy_of(saved, tmp_path):
    _, ckpt, _ = saved
    return save_checkpoint(tmp_path / "copy", ckpt)


def test_truncated_model_file(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    data = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(data[: len(data) // 2])
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="cannot be loaded as weights") as e:
            load(folder)
        assert str(folder / MODEL_FILE) in str(e.value)


def test_a_pickle_that_would_run_code_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    torch.save({"model": {}, "extra": Exploit()}, folder / MODEL_FILE)
    with pytest.raises(CheckpointError, match="cannot be loaded as weights") as e:
        load_checkpoint(folder)
    assert str(folder / MODEL_FILE) in str(e.value)


class Exploit:
    """A pickled object: ``torch.load(weights_only=True)`` must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("payload", "what"), [([1, 2], "got list"), ({"weights": {}}, "a dict without 'model'")]
)
def test_not_a_checkpoint_payload(saved, tmp_path, payload, what):
    folder = copy_of(saved, tmp_path)
    torch.save(payload, folder / MODEL_FILE)
    with pytest.raises(CheckpointError, match="not a SHAN checkpoint") as e:
        load_checkpoint(folder)
    assert what in str(e.value) and MODEL_FILE in str(e.value)


def test_non_finite_weight(saved, tmp_path):
    _, ckpt, _ = saved
    weights = {k: v.clone() for k, v in ckpt.weights.items()}
    weights["img_fc.weight"][0, 0] = float("nan")
    folder = save_checkpoint(tmp_path / "nan", Checkpoint(weights, ckpt.config, VOCAB))
    load_checkpoint(folder)  # the training loader reads it; the model loader refuses it
    with pytest.raises(CheckpointError, match="'img_fc.weight' holds NaN or infinite") as e:
        load_model(folder)
    assert f"{folder}/{MODEL_FILE}" in str(e.value)


def test_weights_that_do_not_fit_the_config(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    cfg = yaml.safe_load((folder / CONFIG_FILE).read_text())
    cfg["model"]["d"] = 32  # the weights are for d=16
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="do not match config.yaml") as e:
        load_model(folder)
    assert f"{folder}/{MODEL_FILE}" in str(e.value)


def test_a_weight_missing(saved, tmp_path):
    _, ckpt, _ = saved
    weights = {k: v for k, v in ckpt.weights.items() if k != "gru.weight_hh_l0"}
    folder = save_checkpoint(tmp_path / "missing", Checkpoint(weights, ckpt.config, VOCAB))
    with pytest.raises(CheckpointError, match="do not match") as e:
        load_model(folder)
    assert "gru.weight_hh_l0" in str(e.value)


def test_a_vocabulary_of_another_size(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    Vocabulary([*WORDS, "zebra"]).save(folder / VOCAB_FILE)  # embedding rows no longer fit
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(folder)


@pytest.mark.parametrize("name", [MODEL_FILE, CONFIG_FILE, VOCAB_FILE])
def test_a_missing_file(saved, tmp_path, name):
    folder = copy_of(saved, tmp_path)
    (folder / name).unlink()
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=f"checkpoint {folder} has no {name}"):
            load(folder)


def test_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (CONFIG_FILE, b"model: [unclosed", "not valid YAML"),
        (CONFIG_FILE, b"model:\n  d: -1\n", "not a valid config"),
        (CONFIG_FILE, b"\xff\xfe\x00", "not UTF-8"),
        (VOCAB_FILE, b"{not json", "not valid json"),
        (VOCAB_FILE, b'{"word2idx": {"a": 0}}', "id 0 must be '<pad>'"),
        (VOCAB_FILE, b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_damaged_description_files(saved, tmp_path, name, content, message):
    folder = copy_of(saved, tmp_path)
    (folder / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(folder)
    assert name in str(e.value)


def test_a_full_disk_is_a_storage_error_naming_the_checkpoint(saved, tmp_path):
    from shan.data.fs import StorageError

    _, ckpt, _ = saved
    with mounted_tmpfs(tmp_path / "small", "64k") as small:
        folder = small / "run" / "best"
        with pytest.raises(StorageError, match=rf"cannot write the checkpoint {folder}: no "
                           r"space left on device \(errno 28\)"):  # fmt: skip
            save_checkpoint(folder, ckpt)
