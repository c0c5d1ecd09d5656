"""Data preparation for KunlunBaize: ``kunlun prepare`` and the reader of its on-disk token format.

Reading a prepared dataset (this package's exports, from :mod:`kunlunbaize.data.format`) needs only numpy.
Preparing one is ``kunlunbaize.data.prepare.prepare`` (or ``kunlun prepare``); it needs ``tokenizers`` and
``transformers`` (``pip install 'kunlunbaize[train]'``), plus ``pyarrow``/``datasets`` for Parquet files and saved
Hugging Face datasets (``pip install 'kunlunbaize[data]'``).
"""

from .format import FORMAT, DataError, choose_dtype, is_prepared, load_index, load_meta, open_split

__all__ = ["FORMAT", "DataError", "choose_dtype", "is_prepared", "load_index", "load_meta", "open_split"]
