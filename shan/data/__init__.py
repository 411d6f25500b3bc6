"""The project's Parquet data set format: writing, converting, generating, validating, reading."""

from shan.data.format import DataError, DatasetCard, load_card

__all__ = ["DataError", "DatasetCard", "load_card"]
