"""The image index: retrieve with a first stage, rerank with SHAN.

- :mod:`shan.index.card`: the card (``index.json``): format, model digest, data fingerprint,
  sizes, FAISS kind and parameters, shards, every file's size and sha256;
- :mod:`shan.index.ann`: FAISS over the first-stage image vectors (exact below a size, IVF or
  HNSW past it);
- :mod:`shan.index.store`: writing an index folder (staging, card last, never over what the
  project did not write), the fragments sharded;
- :mod:`shan.index.reader`: opening one for queries, refused with one line when it was built
  from another model or data set; fragments memory-mapped so a rerank reads only its rows.
"""

from shan.index.card import CARD, FORMAT, IndexCard, model_digest
from shan.index.reader import OpenIndex, check_card, open_index
from shan.index.store import SHARD_SIZE, IndexWriter, check_destination, read_card

__all__ = [
    "CARD",
    "FORMAT",
    "SHARD_SIZE",
    "IndexCard",
    "IndexWriter",
    "OpenIndex",
    "check_card",
    "check_destination",
    "model_digest",
    "open_index",
    "read_card",
]
