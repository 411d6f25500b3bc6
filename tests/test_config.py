import pytest

from shan.config import CONFIG_DIR, Config, ConfigError, config_from_dict, load_config


def test_defaults_follow_the_spec():
    c = Config()
    assert (c.model.d, c.model.d_a, c.model.lambda_l2l, c.model.mu) == (1024, 256, 9.0, 0.5)
    assert (c.loss.margin, c.optim.lr, c.optim.grad_clip, c.optim.batch_size) == (
        0.2,
        2e-4,
        2.0,
        128,
    )


def test_overrides_are_typed_and_nested():
    c = load_config(None, ["model.d=64", "optim.lr=1e-3", "loss.per_step=true", "seed=3"])
    assert c.model.d == 64 and c.optim.lr == 1e-3 and c.loss.per_step is True and c.seed == 3
    assert isinstance(c.optim.lr, float)
    c = load_config(None, ["model.glove_path=/x/g.txt", "data.val_max_images=null"])
    assert c.model.glove_path == "/x/g.txt" and c.data.val_max_images is None


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.dd=3", "unknown config key model.dd"),
        ("nothing=3", "unknown config key nothing"),
        ("model.d=big", "model.d: expected int"),
        ("model.affinity=sum", "model.affinity must be one of"),
        ("model.d", "key=value"),
        ("loss.negatives=some", "loss.negatives"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d: 8\n  colour: red\n")
    with pytest.raises(ConfigError, match="model.colour"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no config named"):
        load_config("no-such-config")


TEST_CONFIGS = CONFIG_DIR.parents[1] / "tests" / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(TEST_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    c = load_config(str(path))
    assert config_from_dict(c.to_dict()) == c
    assert c.name == path.stem


def test_configs_exist():
    assert {"demo", "f30k", "coco"} <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}
