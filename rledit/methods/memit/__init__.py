"""MEMIT: locate-then-edit with corpus key statistics. Importing this package registers the method "memit".

Its corpus, statistics and key/value computation are shared with AlphaEdit (:mod:`rledit.methods.alphaedit`).
"""

from rledit.methods.memit.config import LocateEditHparams, MEMITHparams
from rledit.methods.memit.corpus import BUNDLED_CORPORA, Corpus, CorpusError, load_corpus
from rledit.methods.memit.method import LocateThenEditMethod, MEMITMethod, check_output_projections
from rledit.methods.memit.stats import KeyStatistics, load_or_compute_statistics

__all__ = [
    "BUNDLED_CORPORA",
    "Corpus",
    "CorpusError",
    "KeyStatistics",
    "LocateEditHparams",
    "LocateThenEditMethod",
    "MEMITHparams",
    "MEMITMethod",
    "check_output_projections",
    "load_corpus",
    "load_or_compute_statistics",
]
