"""The reliability table of docs/reliability.md is the bad-input case lists of the tests, word for
word."""

from tests import reliability


def test_reliability_page_table_matches_the_cases():
    page = reliability.PAGE.read_text()
    assert reliability.page_section(page) == reliability.table(), (
        "docs/reliability.md's table is stale: run `python tests/reliability.py --write`"
    )
    assert reliability.BEGIN not in (reliability.ROOT / "README.md").read_text()  # one home


def test_every_case_has_a_unique_id_and_names_what_is_wrong():
    cases = reliability.all_cases()
    assert len(cases) >= 30
    assert {c.job for c in cases} == {
        "prepare_data",
        "train",
        "sweep",
        "evaluate",
        "search",
        "index",
    }
    ids = [(c.job, c.id) for c in cases]
    assert len(ids) == len(set(ids))
    assert all(c.names and c.input for c in cases)
