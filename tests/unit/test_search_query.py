"""Search queries (``shan.search.query``): a query's scores are its caption's column of the
library's full similarity matrix, the ranking is by the total with ties in split order; an
empty sentence, one of punctuation only or only unknown words, one too long and too many
queries are refused, in errors of bounded length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shan.errors import JobError
from shan.scoring import encode_images, score_matrix
from shan.search.query import (
    MAX_QUERIES,
    MAX_QUERY_CHARS,
    MAX_QUERY_WORDS,
    check_count,
    format_matches,
    parse_query,
    score_queries,
    top_matches,
)
from shan.vocab import Vocabulary
from tests.helpers import WORDS, tiny_model


def test_query_scores_are_the_full_matrix_columns():
    model = tiny_model().float()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, 5, 12)).astype(np.float16)
    counts = np.array([5, 3, 1, 5, 4, 2, 5], dtype=np.int32)
    tokens = [[1, 5, 6, 2], [1, 9, 2], [1, 4, 7, 8, 10, 2]]
    full = score_matrix(model, features, counts, tokens, torch.device("cpu"), bf16=False)
    images = encode_images(model, features, counts, torch.device("cpu"), chunk=3)  # joined right
    for block in (None, (2, 1)):
        got = score_queries(model, images, tokens, block)
        for key in ("total", "l2l", "g2l", "g2g"):
            assert got[key].shape == (7, 3)
            np.testing.assert_allclose(got[key], full[key], rtol=0, atol=1e-5)
    one = score_queries(model, images, [tokens[1]])  # alone: the same column
    np.testing.assert_allclose(one["total"][:, 0], full["total"][:, 1], atol=1e-5)


def test_top_matches_rank_by_the_total_with_stable_ties():
    total = np.array([[0.1, 0.5], [0.9, 0.5], [0.4, 0.2], [0.9, 0.5]], dtype=np.float32)
    steps = {k: total * (i + 2) for i, k in enumerate(("l2l", "g2l", "g2g"))}
    steps["l2l"][0, 0] = 99.0  # a step's score never changes the rank
    ids = np.array([10, 11, 12, 13])
    top = top_matches({"total": total, **steps}, ids, 3)
    assert [(m.rank, m.row, m.image) for m in top[0]] == [(1, 1, 11), (2, 3, 13), (3, 2, 12)]
    assert [m.row for m in top[1]] == [0, 1, 3]  # three equal totals: split order
    m = top[0][2]
    assert (m.total, m.l2l, m.g2l, m.g2g) == pytest.approx((0.4, 0.8, 1.2, 1.6))
    assert len(top_matches({"total": total, **steps}, ids, 10)[0]) == 4  # K above N: all
    ties = np.zeros((300, 1), dtype=np.float32)
    ties[[7, 250]] = 1.0
    many = top_matches({k: ties for k in ("total", "l2l", "g2l", "g2g")}, np.arange(300), 12)
    assert [m.row for m in many[0]] == [7, 250, *range(7), 8, 9, 10]


def test_parse_query_refuses_empty_and_all_unknown_sentences():
    vocab = Vocabulary(WORDS)
    q = parse_query(vocab, "A red zebra on the grass", n=1)
    assert q.unknown == ["zebra"]
    assert q.tokens == vocab.encode("A red zebra on the grass")
    assert parse_query(vocab, "a dog " * 10, max_words=3).tokens == vocab.encode("a dog a")
    with pytest.raises(JobError, match=r"query 2 is empty"):
        parse_query(vocab, "   ", n=2)
    with pytest.raises(JobError, match=r"query 3 .*unknown: zebra, okapi\)$"):
        parse_query(vocab, "Zebra okapi zebra", n=3)


def test_a_query_is_bounded_in_characters_and_words():
    vocab = Vocabulary(WORDS)
    parse_query(vocab, "a" + " dog" * (MAX_QUERY_WORDS - 1))  # at the limit
    with pytest.raises(JobError, match=rf"query 4 \('a dog .*\.\.\. \(801 characters\)\) has "
                       rf"{MAX_QUERY_WORDS + 1} words; at most {MAX_QUERY_WORDS}"):  # fmt: skip
        parse_query(vocab, "a" + " dog" * MAX_QUERY_WORDS, n=4)
    text = "zq " * 40_000  # 120,000 characters of unknown words
    with pytest.raises(JobError) as info:
        parse_query(vocab, text, n=1)
    message = str(info.value)
    assert message == (f"query 1 ({text[:60]!r}... (120,000 characters)) has 120,000 "
                       f"characters; at most {MAX_QUERY_CHARS:,} are accepted")  # fmt: skip


def test_a_query_of_punctuation_only_is_refused():
    vocab = Vocabulary([*WORDS, ".", ","])
    with pytest.raises(JobError, match=r"query 2 is empty: '\. , \.' has no word, only punct"):
        parse_query(vocab, ". , .", n=2)
    assert parse_query(vocab, "a dog .").tokens == vocab.encode("a dog .")


def test_an_error_about_unknown_words_names_ten_and_counts_the_rest():
    vocab = Vocabulary(WORDS)
    words = [f"zq{i}" for i in range(150)]
    with pytest.raises(JobError) as info:
        parse_query(vocab, " ".join(words), n=1)
    message = str(info.value)
    assert message.endswith(f"(unknown: {', '.join(words[:10])} and 140 more)")
    assert len(message) < 300


def test_the_number_of_queries_is_bounded():
    check_count(MAX_QUERIES)
    with pytest.raises(JobError, match="no query"):
        check_count(0)
    with pytest.raises(JobError, match=f"1,001 queries: a search takes at most {MAX_QUERIES:,}"):
        check_count(MAX_QUERIES + 1)


def test_the_table_of_a_query_lists_few_unknown_words():
    vocab = Vocabulary(WORDS)
    q = parse_query(vocab, "a " + " ".join(f"zq{i}" for i in range(30)))
    assert format_matches(q, []).splitlines()[0].endswith("zq9 and 20 more)")
