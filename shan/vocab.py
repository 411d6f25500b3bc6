"""Tokenizer and vocabulary in SCAN's ``*_precomp_vocab.json`` format.

The json holds ``{"word2idx": {word: id}, "idx2word": {"id": word}, "idx": size}``. Ids 0 to 3
are ``<pad>``, ``<start>``, ``<end>``, ``<unk>``. Captions are tokenized as SCAN's vocab.py and
data.py did, ``nltk.tokenize.word_tokenize(caption.lower())``, then wrapped in ``<start>`` ...
``<end>``. NLTK's Punkt sentence model (downloaded data) is not used: sentences are split by
Punkt without training data but with the English abbreviations below, which for lower-cased
text splits as the model does except after an abbreviation missing from that list
(benchmarks/results/tokenizer_agreement.txt; docs/model.md, "Tokens").
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from importlib.metadata import version
from pathlib import Path

from shan.errors import VocabError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
MAX_WORDS = 1000  # words a caption keeps at most: the data format's limit (and data.max_words')

# Words that Punkt's English model treats as abbreviations (a period after them does not end a
# sentence), those likely in captions: titles, streets, places, times. Picked by hand, each checked
# to be in the model's list; "etc", "e.g", "i.e", "t.v" are not in it (a period after them ends a
# sentence). Single letters ("j.") and numbers ("3.") need no entry: before a lower-case word
# Punkt never ends a sentence there.
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof gen col lt maj sen rep sr jr st ave co corp inc ltd bros vs ft mg
    u.s u.s.a u.k u.n d.c a.m p.m ph.d n.y l.a j.r j.p calif fla wash ariz conn mich minn
    jan feb aug sept oct nov dec wed fri""".split()
)
_INNER_END = re.compile(r"[.?!](?=[\s\S])")  # Punkt splits only after '.', '?', '!' + more text
# Initials of three letters or more ("e.s.e.", "u.s.a."): before a lower-case word they are an
# abbreviation, as Punkt's English model takes them (a sentence does not start with a lower-case
# word, and SCAN lower-cases first). Two letters ("e.g.", "t.v.") keep ending a sentence, as the
# model does.
_INITIALS_END = re.compile(r"(?:^|\s)[^\W\d_](?:\.[^\W\d_]){2,}\.\s*$")


# ``import nltk`` imports every NLTK module, and with them SciPy and scikit-learn when they are
# installed (MLflow installs them): about 3 s of CPU in each process that tokenizes, for
# statistics and classifiers the tokenizers never use. NLTK imports them optionally (a missing
# one disables only those functions), so they are hidden while NLTK loads: 0.7 s instead.
_NLTK_EXTRAS = ("scipy", "sklearn")


@contextmanager
def _without(*names: str) -> Iterator[None]:
    """Within the block, ``import NAME`` of each of ``names`` not yet imported fails."""
    hidden = [n for n in names if n not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


@cache
def _nltk() -> tuple[Callable[[str], list[str]], Callable[[str], list[str]]]:
    """(sentence splitter, word splitter), imported on first use: ``import nltk`` takes seconds.

    The splitter is Punkt with no trained model (nothing to download) but :data:`ABBREVIATIONS`;
    the word splitter is what ``word_tokenize`` applies to each sentence and needs no data.
    """
    with _without(*_NLTK_EXTRAS):
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params).tokenize, NLTKWordTokenizer().tokenize


def tokenizer_id() -> str:
    """What converted data sets record as their tokenizer (``DatasetCard.tokenizer``).

    >>> tokenizer_id()  # doctest: +ELLIPSIS
    'nltk ... word_tokenize, lower-cased; Punkt without model, shan.vocab.ABBREVIATIONS'
    """
    return (
        f"nltk {version('nltk')} word_tokenize, lower-cased; "
        "Punkt without model, shan.vocab.ABBREVIATIONS"
    )


def tokenize(text: str) -> list[str]:
    r"""Lower-case ``text`` and split it as NLTK's ``word_tokenize``: sentences, then words.

    >>> tokenize('A dog\'s "ball" isn\'t red. Mr. Lee paid $3.50')  # doctest: +NORMALIZE_WHITESPACE
    ['a', 'dog', "'s", '``', 'ball', "''", 'is', "n't", 'red', '.',
     'mr.', 'lee', 'paid', '$', '3.50']
    """
    split_sentences, split_words = _nltk()
    text = text.lower().strip()
    sentences = _joined(split_sentences(text)) if _INNER_END.search(text) else [text]
    return [word for sentence in sentences for word in split_words(sentence)]


def _joined(sentences: list[str]) -> list[str]:
    """``sentences`` with each one that starts with a lower-case letter after initials
    (:data:`_INITIALS_END`) joined to the one before."""
    out: list[str] = []
    for s in sentences:
        if out and s[:1].islower() and _INITIALS_END.search(out[-1]):
            out[-1] = f"{out[-1]} {s}"
        else:
            out.append(s)
    return out


class Vocabulary:
    """Word <-> id mapping; unknown words map to ``<unk>``."""

    def __init__(self, words: Iterable[str]) -> None:
        self.idx2word: list[str] = []
        self.word2idx: dict[str, int] = {}
        for w in SPECIALS:
            self._add(w)
        for w in words:
            self._add(w)

    def _add(self, word: str) -> None:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[UNK])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def encode(self, caption: str, max_words: int | None = None) -> list[int]:
        """Token ids of ``caption``: ``<start>``, the words (at most ``max_words``), ``<end>``."""
        words = tokenize(caption)
        if max_words is not None:
            words = words[:max_words]
        return [self.word2idx[START], *(self(w) for w in words), self.word2idx[END]]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.idx2word[i] for i in ids]

    # -- SCAN json format -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "idx": len(self.idx2word),
        }

    @classmethod
    def from_json(cls, data: object, source: str = "vocab json") -> Vocabulary:
        """Read SCAN's format; any inconsistency raises :class:`VocabError` naming ``source``."""
        if not isinstance(data, dict) or "word2idx" not in data:
            raise VocabError(f"{source}: expected an object with 'word2idx' (SCAN vocab format)")
        w2i = data["word2idx"]
        if not isinstance(w2i, dict) or not w2i:
            raise VocabError(f"{source}: 'word2idx' must be a non-empty object")
        by_id: dict[int, str] = {}
        for word, idx in w2i.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise VocabError(f"{source}: word2idx[{word!r}] = {idx!r} is not an id")
            if idx in by_id:
                raise VocabError(f"{source}: id {idx} is given to {by_id[idx]!r} and {word!r}")
            by_id[idx] = word
        if sorted(by_id) != list(range(len(by_id))):
            raise VocabError(f"{source}: ids must be 0..{len(by_id) - 1} without gaps")
        for i, special in enumerate(SPECIALS):
            if by_id.get(i) != special:
                raise VocabError(f"{source}: id {i} must be {special!r}, got {by_id.get(i)!r}")
        _check_idx2word(data, by_id, source)
        vocab = cls([])
        vocab.idx2word = [by_id[i] for i in range(len(by_id))]
        vocab.word2idx = {w: i for i, w in enumerate(vocab.idx2word)}
        return vocab

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise VocabError(f"vocab file {path} does not exist") from None
        except IsADirectoryError:
            raise VocabError(f"vocab file {path} is a folder") from None
        except UnicodeDecodeError as e:
            raise VocabError(f"vocab file {path} is not UTF-8 text ({e.reason})") from e
        except json.JSONDecodeError as e:
            raise VocabError(f"vocab file {path} is not valid json: {e}") from e
        return cls.from_json(data, source=str(path))

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (SCAN's threshold)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = [w for w, n in counts.most_common() if n >= min_count and w not in SPECIALS]
        return cls(kept)


def _check_idx2word(data: dict, by_id: dict[int, str], source: str) -> None:
    if "idx" in data and data["idx"] != len(by_id):
        raise VocabError(f"{source}: 'idx' is {data['idx']!r} but word2idx has {len(by_id)} words")
    i2w = data.get("idx2word")
    if i2w is None:
        return
    if not isinstance(i2w, dict):
        raise VocabError(f"{source}: 'idx2word' must be an object")
    for key, word in i2w.items():
        try:
            idx = int(key)
        except ValueError:
            raise VocabError(f"{source}: idx2word key {key!r} is not an integer") from None
        if by_id.get(idx) != word:
            raise VocabError(f"{source}: idx2word[{key}] = {word!r} disagrees with word2idx")
