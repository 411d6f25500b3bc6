"""User errors (``shan.errors``): they cross processes (Ray workers, the MLflow fatal box) as
their own type, with all their problems."""

from __future__ import annotations

import pickle

import pytest

from shan.config import ConfigError
from shan.errors import BY_NAME, USER_ERRORS, JobError, from_record, problems, to_record


@pytest.mark.parametrize("cls", USER_ERRORS, ids=lambda c: c.__name__)
def test_user_errors_cross_as_their_type(cls):
    e = cls("a must be 1, got 2") if cls is not ConfigError else cls("a bad", "b bad")
    back = from_record(to_record(e))
    assert type(back) is cls and problems(back) == problems(e)
    assert type(pickle.loads(pickle.dumps(back))) is cls


def test_an_unknown_type_becomes_a_job_error():
    back = from_record({"type": "KeyError", "message": "x"})
    assert type(back) is JobError and "KeyError: x" in str(back)
    assert set(BY_NAME) == {c.__name__ for c in USER_ERRORS}


def test_the_modules_that_raise_them_re_export_the_same_classes():
    """``from shan.config import ConfigError`` (and the others) still work, as the one class."""
    from shan import config, glove, vocab
    from shan.data import format as data_format
    from shan.data import fs
    from shan.errors import ConfigError as Defined
    from shan.errors import DataError, GloveError, StorageError, VocabError

    assert config.ConfigError is Defined is ConfigError
    assert data_format.DataError is DataError and fs.StorageError is StorageError
    assert glove.GloveError is GloveError and vocab.VocabError is VocabError
    assert issubclass(StorageError, OSError)
    assert [c.__name__ for c in USER_ERRORS] == [
        "ConfigError", "DataError", "StorageError", "GloveError", "VocabError",
        "CheckpointError", "JobError",
    ]  # fmt: skip
