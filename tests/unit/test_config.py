import dataclasses
import pickle
import re
import warnings
from pathlib import Path

import pytest

from shan.config import (
    CONFIG_DIR,
    NAME_MAX,
    Config,
    ConfigError,
    OptimConfig,
    config_from_dict,
    load_config,
    name_problem,
)
from tests.helpers import TINY


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


def test_text_fields_take_the_text_as_written():
    c = load_config(None, ["data.train_split=2014", "tracking.run_name=yes", "name=1e3"])
    assert (c.data.train_split, c.tracking.run_name, c.name) == ("2014", "yes", "1e3")
    assert load_config(None, ["tracking.run_name=null"]).tracking.run_name is None


def test_values_are_taken_as_they_are():
    """The command line's typed flags: ``--name null`` is the name "null", not None."""
    c = load_config(None, ["tracking.run_name=other"], {"tracking.run_name": "null"})
    assert c.tracking.run_name == "null"
    c = load_config(None, [], {"scaling.num_workers": 3, "scaling.use_gpu": True})
    assert (c.scaling.num_workers, c.scaling.use_gpu) == (3, True)
    with pytest.raises(ConfigError, match=r"tracking.run_name must be .*, got 2024"):
        load_config(None, [], {"tracking.run_name": 2024})


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.dd=3", "unknown config key model.dd"),
        ("nothing=3", "unknown config key nothing"),
        ("model.d=big", "model.d must be an integer, got 'big'"),
        ("model.d=true", "model.d must be an integer, got True"),
        ("optim.epochs=2.5", "optim.epochs must be an integer, got 2.5"),
        ("model.freeze_glove=3", "model.freeze_glove must be true or false, got 3"),
        ("model.affinity=sum", "model.affinity must be one of cosine, dot"),
        ("model.d", "key=value"),
        ("=3", "empty key"),
        ("model..d=3", "empty key"),
        ("model.d=[1", "not a valid YAML scalar"),
        ("model=3", "model must be a mapping, got 3"),
        ("loss.negatives=some", "loss.negatives"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


# every field of every section: values just out of range are refused, naming key and value
OUT_OF_RANGE = [
    ("name", "''", "name must be a name"),
    ("name", "a/b", "name must be a name"),
    ("seed", "-1", "seed must be an integer >= 0, got -1"),
    ("seed", "4294967296", "seed must be an integer <= 4294967295"),
    ("model.feature_dim", "0", "model.feature_dim must be an integer >= 1, got 0"),
    ("model.d", "-3", "model.d must be an integer >= 1, got -3"),
    ("model.word_dim", "0", "model.word_dim must be an integer >= 1, got 0"),
    ("model.glove_path", "' '", "model.glove_path must be a non-empty text or null"),
    ("model.affinity", "l1", "model.affinity must be one of cosine, dot, got 'l1'"),
    ("model.lambda_l2l", "0", "model.lambda_l2l must be > 0 and finite, got 0.0"),
    ("model.lambda_g2l", "-inf", "model.lambda_g2l must be > 0 and finite, got -inf"),
    ("model.mu", "1.5", "model.mu must be in [0, 1], got 1.5"),
    ("model.mu", "nan", "model.mu must be in [0, 1], got nan"),
    ("model.d_a", "0", "model.d_a must be an integer >= 1, got 0"),
    ("model.w_l2l", "-0.1", "model.w_l2l must be >= 0 and finite, got -0.1"),
    ("model.w_g2l", "inf", "model.w_g2l must be >= 0 and finite, got inf"),
    ("model.w_g2g", "nan", "model.w_g2g must be >= 0 and finite, got nan"),
    ("model.direction", "both", "model.direction must be one of full, i2t, t2i"),
    ("model.first_stage_dim", "-1", "model.first_stage_dim must be an integer >= 0, got -1"),
    ("model.first_stage_dim", "5000", "model.first_stage_dim must be an integer <= 4096"),
    ("model.first_stage_pool", "mean", "model.first_stage_pool must be one of max, attention"),
    ("loss.first_stage_temperature", "0", "loss.first_stage_temperature must be > 0"),
    ("loss.margin", "-5", "loss.margin must be >= 0 and finite, got -5.0"),
    ("loss.margin", "nan", "loss.margin must be >= 0 and finite, got nan"),
    ("loss.negatives", "semi", "loss.negatives must be one of hardest, all, got 'semi'"),
    ("loss.negatives_from", "rank", "loss.negatives_from must be one of global, local, got 'rank'"),
    ("optim.epochs", "0", "optim.epochs must be an integer >= 1, got 0"),
    ("optim.batch_size", "1", "optim.batch_size must be an integer >= 2, got 1"),
    ("optim.lr", "-1", "optim.lr must be > 0 and finite, got -1.0"),
    ("optim.lr", "0", "optim.lr must be > 0 and finite, got 0.0"),
    ("optim.lr", "nan", "optim.lr must be > 0 and finite, got nan"),
    ("optim.lr", ".inf", "optim.lr must be > 0 and finite, got inf"),
    ("optim.lr_decay_epoch", "-1", "optim.lr_decay_epoch must be an integer >= 0, got -1"),
    ("optim.lr_decay", "0", "optim.lr_decay must be in (0, 1]"),
    ("optim.lr_decay", "2", "optim.lr_decay must be in (0, 1]"),
    ("optim.grad_clip", "-1", "optim.grad_clip must be > 0 and finite, got -1.0"),
    ("optim.grad_clip", "inf", "optim.grad_clip must be > 0 and finite, got inf"),
    ("optim.warmup_steps", "-1", "optim.warmup_steps must be an integer >= 0, got -1"),
    ("optim.weight_decay", "-0.01", "optim.weight_decay must be >= 0 and finite, got -0.01"),
    ("data.path", "''", "data.path must be a non-empty text or null"),
    ("data.train_split", "../x", "data.train_split must be a name"),
    ("data.val_split", "''", "data.val_split must be a name"),
    ("data.max_words", "0", "data.max_words must be an integer >= 1, got 0"),
    ("data.shuffle_buffer", "-1", "data.shuffle_buffer must be an integer >= 0, got -1"),
    ("data.val_max_images", "0", "data.val_max_images must be an integer >= 1 or null, got 0"),
    ("scaling.num_workers", "0", "scaling.num_workers must be an integer >= 1 or null, got 0"),
    ("scaling.num_workers", "[3, 2]", "scaling.num_workers must have min <= max, got [3, 2]"),
    ("scaling.num_workers", "[0, 2]", "scaling.num_workers must have min an integer >= 1"),
    ("scaling.num_workers", "[1, 2.5]", "must have max an integer >= 1, got [1, 2.5]"),
    ("scaling.num_workers", "[2]", "scaling.num_workers must be an integer >= 1 or a range [min"),
    ("scaling.num_workers", "[1, 2, 3]", "must be an integer >= 1 or a range [min, max]"),
    ("scaling.num_workers", "two", "scaling.num_workers must be an integer or a list or null"),
    ("scaling.resize_interval", "0", "scaling.resize_interval must be > 0 and finite, got 0.0"),
    ("scaling.start_timeout", "0", "scaling.start_timeout must be > 0 and finite, got 0.0"),
    ("scaling.cpus_per_worker", "0", "scaling.cpus_per_worker must be > 0 and finite"),
    ("scaling.cpus_per_worker", "nan", "scaling.cpus_per_worker must be > 0 and finite"),
    ("scaling.gpus_per_worker", "0", "scaling.gpus_per_worker must be > 0"),
    ("scaling.gpus_per_worker", "1.5", "a fraction of at most 1 or a whole number, got 1.5"),
    ("scaling.score_block", "0", "scaling.score_block must be an integer >= 1 or null, got 0"),
    ("scaling.wait_timeout", "0", "scaling.wait_timeout must be > 0"),
    ("scaling.wait_timeout", "nan", "scaling.wait_timeout must be > 0"),
    ("scaling.placement_strategy", "ANYWHERE", "one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    ("tracking.experiment", "''", "tracking.experiment must be a non-empty text"),
    ("tracking.run_name", ".hidden", "tracking.run_name must be a name"),
    ("tracking.storage_path", "''", "tracking.storage_path must be a non-empty text or null"),
    ("tracking.log_every", "0", "tracking.log_every must be an integer >= 1, got 0"),
    ("tracking.keep_checkpoints", "0", "tracking.keep_checkpoints must be an integer >= 1"),
    ("tracking.max_failures", "-1", "tracking.max_failures must be an integer >= 0, got -1"),
    ("tracking.checkpoint_upload", "later", "checkpoint_upload must be one of async, sync, got"),
    ("tracking.system_metrics_every", "-1", "tracking.system_metrics_every must be 0 (off) or"),
    ("tracking.system_metrics_every", "inf", "tracking.system_metrics_every must be 0 (off) or"),
    ("tracking.system_metrics_every", "0.5", "tracking.system_metrics_every must be 0 (off) or"),
]


@pytest.mark.parametrize("key, raw, message", OUT_OF_RANGE, ids=lambda v: str(v)[:30])
def test_every_range_is_checked(key, raw, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={raw}"])
    assert info.value.problems == [info.value.problems[0]], "one problem, one line"
    assert message in info.value.problems[0]
    assert info.value.problems[0].startswith(key)


def test_a_range_of_workers_is_an_elastic_group():
    c = load_config(None, ["scaling.num_workers=[1, 4]", "scaling.resize_interval=5"])
    sc = c.scaling
    assert (sc.num_workers, sc.elastic, sc.worker_range(), sc.resize_interval) == (
        [1, 4],
        True,
        (1, 4),
        5.0,
    )
    assert sc.describe_workers(3) == "3 (elastic 1-4)"
    fixed = load_config(None, ["scaling.num_workers=2"]).scaling
    assert (fixed.elastic, fixed.worker_range(), fixed.describe_workers(2)) == (False, (2, 2), "2")
    assert load_config(None, []).scaling.worker_range() is None
    assert c.tracking.checkpoint_upload == "async"  # the default: the steps do not wait


def test_every_problem_of_a_range_is_reported_with_the_rest():
    """0, a non-integer, min > max: each its line, with the other sections' problems and the
    global batch's (shared out among max workers)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["scaling.num_workers=[0, 1.5]", "tracking.checkpoint_upload=x",
                           "scaling.resize_interval=-1"])  # fmt: skip
    assert info.value.problems == [
        "scaling.num_workers must have min an integer >= 1, got [0, 1.5]",
        "scaling.num_workers must have max an integer >= 1, got [0, 1.5]",
        "scaling.resize_interval must be > 0 and finite, got -1.0",
        "tracking.checkpoint_upload must be one of async, sync, got 'x'",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["scaling.num_workers=[4, 3]", "optim.batch_size=2", "optim.lr=0"])
    assert [p.split()[0] for p in info.value.problems] == ["optim.lr", "scaling.num_workers"]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["scaling.num_workers=[1, 3]", "optim.batch_size=2"])
    (line,) = info.value.problems
    assert "number of workers (3)" in line  # the largest group must have a share each


def test_every_field_has_a_range_case():
    """A new config field needs its range and a line in OUT_OF_RANGE (booleans excepted)."""
    flat = Config().flat()
    bools = {k for k, v in flat.items() if isinstance(v, bool)}
    bools |= {"scaling.use_gpu"}  # bool | None
    assert set(flat) - bools - {k for k, _, _ in OUT_OF_RANGE} == set()


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=1e-9", "loss.margin=0", "model.mu=0", "model.mu=1", "model.w_l2l=0",
        "optim.lr_decay=1", "optim.lr_decay_epoch=0", "optim.batch_size=2", "seed=0",
        "seed=4294967295", "scaling.gpus_per_worker=0.25", "scaling.gpus_per_worker=2",
        "data.shuffle_buffer=0", "tracking.max_failures=0",
        "tracking.system_metrics_every=0", "tracking.system_metrics_every=1",
        "tracking.run_name=a", "tracking.run_name=_x.y-z_1", "data.train_split=train-2014",
    ],
)  # fmt: skip
def test_edge_values_are_accepted(override):
    load_config(None, [override])


def test_negatives_come_from_the_global_batch_unless_asked():
    assert Config().loss.negatives_from == "global"
    assert load_config(None, ["loss.negatives_from=local"]).loss.negatives_from == "local"


def test_a_bad_negatives_from_is_reported_with_the_other_loss_problems():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["loss.negatives_from=all", "loss.negatives=semi", "loss.margin=-1"])
    keys = sorted(p.split()[0] for p in info.value.problems)
    assert keys == ["loss.margin", "loss.negatives", "loss.negatives_from"]


@pytest.mark.parametrize(
    "batch, workers, shares",
    [(128, 1, [128]), (128, 4, [32] * 4), (128, 3, [43, 43, 42]), (5, 2, [3, 2]),
     (4, 4, [1] * 4), (7, 4, [2, 2, 2, 1])],
)  # fmt: skip
def test_the_global_batch_is_shared_out_exactly_among_the_workers(batch, workers, shares):
    """The first ``batch % workers`` ranks take one more: the shares sum to the batch."""
    optim = OptimConfig(batch_size=batch)
    assert optim.batch_shares(workers) == shares and sum(shares) == batch
    assert [optim.worker_batch(workers, rank) for rank in range(workers)] == shares


def test_a_global_batch_smaller_than_the_workers_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        OptimConfig(batch_size=3).worker_batch(4)
    (line,) = info.value.problems  # one line
    assert line.startswith("optim.batch_size (3)") and "number of workers (4)" in line


def test_a_batch_smaller_than_the_configured_workers_is_reported_with_the_rest():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.batch_size=2", "scaling.num_workers=3", "optim.lr=-1"])
    assert [p.split()[0] for p in info.value.problems] == ["optim.lr", "optim.batch_size"]
    assert "number of workers (3)" in info.value.problems[1]
    load_config(None, ["optim.batch_size=3", "scaling.num_workers=3"])  # one example each
    load_config(None, ["optim.batch_size=2"])  # workers sized from the cluster: checked then
    with pytest.raises(ConfigError) as info:  # a batch of 1 is one problem, not two
        load_config(None, ["optim.batch_size=1", "scaling.num_workers=3"])
    assert len(info.value.problems) == 1 and ">= 2" in info.value.problems[0]


def test_the_step_weights_must_not_all_be_zero():
    with pytest.raises(ConfigError, match="must not all be 0"):
        load_config(None, ["model.w_l2l=0", "model.w_g2l=0", "model.w_g2g=0"])


def test_all_problems_are_reported_together():
    bad = ["optim.lr=-1", "optim.grad_clip=-1", "loss.margin=-5", "data.max_words=0",
           "seed=-1", "tracking.log_every=0", "scaling.gpus_per_worker=0", "model.d=big",
           "model.colour=red", "model.mu=nan"]  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(None, bad)
    keys = [p.split()[0] for p in info.value.problems]
    assert len(info.value.problems) == len(bad), info.value.problems
    expected = ["optim.lr", "optim.grad_clip", "loss.margin", "data.max_words", "seed",
                "tracking.log_every", "scaling.gpus_per_worker", "model.d", "model.mu"]  # fmt: skip
    assert set(expected) <= set(keys)
    assert str(info.value).count("\n") == len(bad) - 1


def test_config_error_survives_pickling():
    """It crosses from Ray workers to the driver with all its problems."""
    e = pickle.loads(pickle.dumps(ConfigError("a must be 1, got 2", "b must be 3, got 4")))
    assert e.problems == ["a must be 1, got 2", "b must be 3, got 4"]
    assert str(ConfigError("one")) == "one"


def test_a_config_file_is_checked_like_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: c\noptim:\n  lr: -1\n  grad_clip: .nan\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(p))
    assert [x.split()[0] for x in info.value.problems] == ["optim.lr", "optim.grad_clip"]
    data = Config().to_dict()
    data["loss"]["margin"] = -5.0
    with pytest.raises(ConfigError, match="loss.margin"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "name",
    ["a", "run-1", "shan_demo.2", "A9", "_x", "x" * NAME_MAX, "2024", "yes", "null"],
)
def test_run_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "-rm", "a/b", "/abs/folder", "a..b", "../up", "a b", "tab\t",
     "x" * (NAME_MAX + 1), "a\\b", "~home", "a:b", "é", "a\nb", None, 2024],
)  # fmt: skip
def test_run_names_refused(name):
    assert name_problem(name) is not None


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d: 8\n  colour: red\n")
    with pytest.raises(ConfigError, match="model.colour"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no config named"):
        load_config("no-such-config")


def test_the_retired_debug_section_of_nulls_is_ignored(tmp_path):
    """Checkpoints and ``--print-config`` output written while the config had a ``debug``
    section (test hooks, all null in real configs) still load; a value set there is refused."""
    old = {**Config().to_dict(), "debug": {"nan_at_step": None, "rows_log": None}}
    assert config_from_dict(old) == Config()
    p = tmp_path / "printed.yaml"
    p.write_text("name: mine\ndebug:\n  fail_with: null\n  kill_marker: null\n")
    assert load_config(str(p)).name == "mine"
    with pytest.raises(ConfigError, match="unknown config key debug;"):
        config_from_dict({"debug": {"nan_at_step": 3}})
    with pytest.raises(ConfigError, match="unknown config key debug;"):
        load_config(None, ["debug.nan_at_step=1"])


TEST_CONFIGS = Path(TINY).parent
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(TEST_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    c = load_config(str(path))
    assert config_from_dict(c.to_dict()) == c
    assert c.name == path.stem
    assert dataclasses.asdict(c) == c.to_dict()


def test_configs_exist():
    assert {"demo", "f30k", "coco"} <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}


def test_the_packaged_configs_are_package_data_found_by_name():
    import shan

    assert Path(shan.__file__).resolve().parent / "configs" == CONFIG_DIR
    assert load_config("demo") == load_config(str(CONFIG_DIR / "demo.yaml"))
    assert load_config("demo").name == "demo"


def test_a_section_made_in_code_validates_alone():
    """The model and the loss check the section they are given."""
    from shan.config import LossConfig, ModelConfig

    ModelConfig().validate()
    with pytest.raises(ConfigError) as info:
        ModelConfig(d=0, mu=2.0).validate()
    assert [p.split()[0] for p in info.value.problems] == ["model.d", "model.mu"]
    with pytest.raises(ConfigError, match="loss.margin must be >= 0"):
        LossConfig(margin=-1.0).validate()


# -- each key's meaning and allowed values: one place, shown by --help --------------------------
def test_every_key_of_every_section_has_help():
    from shan.config import key_fields

    keys = key_fields()
    assert {k for k, _ in keys} == set(Config().flat())  # every key, and only keys
    for key, f in keys:
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), key


def test_enumerations_are_one_tuple_for_validation_and_help():
    """A field whose validation says "one of ..." has those values as its ``choices``, each of
    them valid; the other text fields accept any name."""
    from shan.config import key_fields

    for key, f in key_fields():
        choices = f.metadata.get("choices", ())
        refused = load_problems(f"{key}=not-a-choice")
        listed = [p for p in refused if p.startswith(f"{key} must be one of ")]
        if not choices:
            assert not listed, f"{key} is validated as an enumeration but has no choices"
            continue
        values = ", ".join(choices) + (" or null" if f.default is None else "")
        assert listed == [f"{key} must be one of {values}, got 'not-a-choice'"]
        for value in choices:
            assert not load_problems(f"{key}={value}"), (key, value)


def load_problems(override: str) -> list[str]:
    try:
        load_config(None, [override])
    except ConfigError as e:
        return e.problems
    return []


def test_keys_help_shows_type_default_and_meaning():
    from shan.config import keys_help

    text = keys_help(100)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    assert any(
        re.fullmatch(r"  optim\.lr +float = 0\.0002 +Adam's learning rate", ln) for ln in lines
    )
    (cap,) = [line for line in lines if line.startswith("  data.val_max_images ")]
    assert cap.split()[1:5] == ["int|null", "=", "null", "cap"]
    assert "scaling.*: Ray resources." in text and "debug" not in text  # no test hooks
    strategy = text[text.index("  scaling.placement_strategy") :]
    assert re.match(r"  scaling\.placement_strategy +text = PACK ", strategy)
    words = " ".join(strategy.split("scaling.score_block")[0].split())
    assert words.endswith("one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")


# -- bounded YAML and model sizes ------------------------------------------------------------------
def test_a_billion_laughs_is_refused_at_its_first_alias_quickly(tmp_path):
    import time

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"laughs.yaml: line 2: a YAML alias \(\*a\)"):
        load_config(str(path))
    assert time.monotonic() - t0 < 2


def test_deep_nesting_and_size_are_bounded(tmp_path):
    from shan.config import YAML_MAX_DEPTH, bounded_yaml

    ok = "[" * YAML_MAX_DEPTH + "]" * YAML_MAX_DEPTH
    assert bounded_yaml(ok, "x") == eval(ok.replace("][", "],["))  # noqa: S307 (nested lists)
    with pytest.raises(ConfigError, match=f"^x: line 1: nested deeper than {YAML_MAX_DEPTH}"):
        bounded_yaml("[" + ok + "]", "x")
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: {d: " + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ConfigError, match="deep.yaml: line 1: nested deeper than"):
        load_config(str(deep))
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1\n" + "#" * 1_000_000)
    with pytest.raises(
        ConfigError, match=r"big.yaml: 1,000,008 bytes, over the limit of 1,000,000"
    ):
        load_config(str(big))
    with pytest.raises(ConfigError, match=r"override model.d: line 1: a YAML alias"):
        load_config(None, ["model.d=&a [1, *a]"])


def test_an_anchor_without_alias_is_plain_yaml(tmp_path):
    path = tmp_path / "anchor.yaml"
    path.write_text("model: &m {d: 64}\n")
    assert load_config(str(path)).model.d == 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d=100000000000", "model.d must be an integer <= 16384, got 100000000000"),
        ("model.feature_dim=20000", "model.feature_dim must be an integer <= 16384, got 20000"),
        ("model.word_dim=5000", "model.word_dim must be an integer <= 4096, got 5000"),
        ("model.d=16000", "model.feature_dim, d, word_dim and d_a make 3,"),
    ],
)
def test_model_sizes_are_bounded(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message), str(e.value)


def test_the_parameter_estimate_is_the_models_count():
    from shan.config import ModelConfig, model_parameters
    from shan.model import SHAN

    cfg = ModelConfig(feature_dim=48, d=64, word_dim=20, d_a=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no GloVe given
        model = SHAN(cfg, vocab_size=10)
    n = sum(p.numel() for name, p in model.named_parameters() if "_emb" not in name)
    assert n == model_parameters(48, 64, 20, 16)
