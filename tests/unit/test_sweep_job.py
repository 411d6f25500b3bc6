"""The sweep job's own rules: how many trials run at once, trial names, the trials' base
config, a failed trial's line (the job itself runs in tests/integration/test_sweep.py)."""

from __future__ import annotations

import pytest

from shan.config import ConfigError, load_config
from shan.errors import DataError
from shan.runtime import Resources
from shan.sweep.job import concurrency, error_line, plan_base, trial_name
from shan.sweep.spec import Asha, Dimension, Sweep
from tests.helpers import TINY


def test_each_trial_needs_its_workers_and_a_cpu_for_its_reads():
    quarter = Resources(1, False, 0.25, 0.0, 1)
    assert concurrency(quarter, {"CPU": 2.0}) == 1  # the tests' head: one at a time
    assert concurrency(Resources(2, False, 1.0, 0.0, 1), {"CPU": 16.0}) == 5
    gpus = Resources(2, True, 4.0, 1.0, 4)
    assert concurrency(gpus, {"CPU": 64.0, "GPU": 4.0}) == 2  # the GPUs bound it
    assert concurrency(gpus, {"CPU": 2.0, "GPU": 0.0}) == 1  # never below one


def test_trial_names_follow_the_parent():
    assert trial_name("sweep-x", "d0a9e_00002") == "sweep-x-t03"
    assert trial_name("sweep-x", "odd") == "sweep-x-odd"


def test_the_base_config_has_the_planned_workers_and_the_trials_epochs():
    cfg = load_config(TINY, ["scaling.num_workers=null", "scaling.cpus_per_worker=null"])
    sweep = Sweep(source="s", dims=[Dimension("loss.margin", "grid", (0.1,))], asha=Asha(5))
    base = plan_base(cfg, sweep, Resources(2, False, 0.5, 0.0, 1))
    assert (base.scaling.num_workers, base.scaling.cpus_per_worker) == (2, 0.5)
    assert base.optim.epochs == 5 and base.scaling.use_gpu is False
    assert cfg.optim.epochs == 2  # the given config is left alone
    with pytest.raises(ConfigError, match="optim.batch_size"):
        plan_base(load_config(TINY, ["optim.batch_size=2"]), sweep, Resources(4, False, 0.5, 0, 1))


def test_a_failed_trials_line_is_its_user_errors_first_line():
    assert error_line(DataError("data set /x does not exist\nmore")) == "data set /x does not exist"
    assert error_line(RuntimeError("boom")).startswith("RuntimeError")
