"""Data loaders and generators for rnnfast's course tasks.

Loaders (each takes a path the user points at their own copy of the data):

- :mod:`rnnfast.data.fashion_mnist`: IDX files (``train/t10k`` images and labels,
  ``.gz`` or not) and the CSV form (label + 784 pixel values);
- :mod:`rnnfast.data.imdb`: the ``aclImdb`` folder tree, a labelled CSV
  (``label,text[,is_valid]``) and ``text<TAB>label`` files, plus a small tokenizer
  and vocabulary;
- :mod:`rnnfast.data.sales`: FRED-style monthly series (``DATE,VALUE`` CSV).

Generators for the self-made data sets live in :mod:`rnnfast.data.synthetic`.

Every loader raises :class:`DataError` (a ``ValueError``) with a message that
names the file, says what was expected and where to get it.
"""

from ._errors import DataError

__all__ = ["DataError"]
