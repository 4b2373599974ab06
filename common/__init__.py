"""The layer under both ``data_prep`` and ``llmrec``: files, formats and conventions they share.

Nothing here imports either package, so a dataset bundle can be built without the recommender and a
recommender served without the data pipeline. ``io`` (atomic writes, sha256, JSON, `ArtifactError`),
``placeholders`` (the ``<user_N>``/``<item_N>`` grammar), ``catalogue`` (ids, titles and maps of the
users and items), ``config`` (dataclasses from YAML + command line) and ``log``.
"""

__version__ = "0.2.0"
