"""Edit data: record files in six formats turned into validated :class:`EditRequest` lists, and T×B streams.

    >>> from rledit.data import load_requests, EditStream
    >>> requests = load_requests("zsre", split="eval", limit=1000)
    >>> for step in EditStream(requests, steps=50, batch=20, seed=0):
    ...     ...  # apply the 20 requests of this step

Named datasets (bundled in the repository's ``data/``, described in ``data/SOURCES.md``): ``"zsre"`` (train: 10,000
MEND-schema records, 35 of them skipped as known bad; eval: 1,037), ``"zsre-knowedit"`` (eval: 1,304) and
``"counterfact"`` (train: 10,000; eval, also called "edit": 10,000). See :mod:`rledit.data.formats` for the
record formats and how their fields map onto :class:`EditRequest`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rledit.data.files import DATA_ENV, DATASETS, data_dir, dataset_file, read_records, skipped_indices
from rledit.data.formats import FORMAT_NAMES, DataError, detect_format, parse_records
from rledit.data.stream import EditStream
from rledit.types import EditRequest

_log = logging.getLogger(__name__)


def load_file(path: str | Path) -> list[EditRequest]:
    """Every record of one file (.json, .json.gz, .jsonl, .jsonl.gz, any known format) as an edit request.

    Raises one :class:`DataError` listing every bad record as ``file#index: reason``. Records listed in a
    ``skipped_records.json`` next to the file are left out (and must really be bad).
    """
    path = Path(path)
    skip = skipped_indices(path)
    requests = parse_records(read_records(path), path.name, skip)
    if skip:
        _log.info("%s: left out %d known bad record(s) listed in its skip list", path.name, len(skip))
    return requests


def load_requests(source: Any, split: str = "eval", limit: int | None = None) -> list[EditRequest]:
    """Load validated edit requests from a named dataset, a file, or records already in memory.

    Args:
        source: ``"zsre"``, ``"zsre-knowedit"``, ``"counterfact"``, a path to a file in any known format, or an
            iterable of records (dicts in any known format, e.g. a ``datasets.Dataset``).
        split: ``"train"`` or ``"eval"`` (``"edit"`` is the same as ``"eval"``); not used for a file path.
        limit: if given, the first ``limit`` requests in file order; more than the file holds is an error.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(source, (str, Path)):
        path = dataset_file(source, split)
        requests, name = load_file(path), path.name
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        name = type(source).__name__
        requests = parse_records([dict(r) if isinstance(r, Mapping) else r for r in source], name)
    else:
        raise DataError(f"source must be a dataset name, a file path or an iterable of records, not "
                        f"{type(source).__name__}")
    if limit is None:
        return requests
    if limit > len(requests):
        raise DataError(f"limit={limit} but {name} holds only {len(requests)} valid requests")
    return requests[:limit]


__all__ = [
    "DATASETS",
    "DATA_ENV",
    "FORMAT_NAMES",
    "DataError",
    "EditStream",
    "data_dir",
    "dataset_file",
    "detect_format",
    "load_file",
    "load_requests",
]
