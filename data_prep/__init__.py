"""Interaction logs + metadata -> a validated dataset bundle with soft+hard prompt corpora.

``python -m data_prep build ...`` writes a bundle; recipes read it with :func:`load_bundle`.
"""

from data_prep.bundle import Bundle, load_bundle
from data_prep.errors import DataError
from data_prep.templates import Templates

__all__ = ["Bundle", "DataError", "Templates", "load_bundle"]
