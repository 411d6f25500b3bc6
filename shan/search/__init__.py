"""Search: which images of a data set split match a sentence. ``index.py`` encodes a split's
images once and caches them; ``query.py`` scores sentences against them with the model's one
scorer (``SHAN.score``); ``job.py`` is the whole search, from a model reference to the matches."""
