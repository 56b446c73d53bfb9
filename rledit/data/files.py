"""Reading record files (.json, .json.gz, .jsonl, .jsonl.gz) and locating the bundled datasets.

The bundled datasets live in the repository's ``data/`` folder (see ``data/SOURCES.md``); set the environment
variable ``RLEDIT_DATA`` to a folder holding the same file names to read them from elsewhere.

A folder may hold ``skipped_records.json`` listing, per file name, records that are known to be bad in the
published data and are left out on purpose (``{"file.json.gz": {"reason": "...", "indices": [39, ...]}}``).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

from rledit.data.formats import DataError

DATA_ENV = "RLEDIT_DATA"
SKIP_LIST_NAME = "skipped_records.json"
SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")

# Named datasets: source -> split -> bundled file name. "edit" is accepted as another name for "eval".
DATASETS: dict[str, dict[str, str]] = {
    "zsre": {"train": "zsre_train.json.gz", "eval": "zsre_eval.json.gz"},
    "zsre-knowedit": {"eval": "zsre_knowedit_eval.json.gz"},
    "counterfact": {"train": "counterfact_train.json.gz", "eval": "counterfact_edit.json.gz"},
}
SPLIT_ALIASES = {"edit": "eval"}


def data_dir() -> Path:
    """The folder the named datasets are read from: ``$RLEDIT_DATA`` if set, else the source checkout's
    ``data/``, else the copy an installed wheel carries (``rledit/_shipped/data``)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    package = Path(__file__).resolve().parents[1]
    for folder in (package.parent / "data", package / "_shipped" / "data"):
        if (folder / "SOURCES.md").is_file():
            return folder
    raise DataError(f"rledit's bundled data is missing: neither {package.parent / 'data'} (a source checkout) nor "
                    f"{package / '_shipped' / 'data'} (an installed wheel) exists; reinstall rledit or set "
                    f"${DATA_ENV} to a folder holding the data files")


def dataset_file(source: str | Path, split: str = "eval") -> Path:
    """The file that :func:`rledit.data.load_requests` reads for ``source`` and ``split``.

    ``source`` is a named dataset (``"zsre"``, ``"zsre-knowedit"``, ``"counterfact"``) or a path to a file in any
    known format (then ``split`` is not used). Raises :class:`DataError` naming what it looked for and where.
    """
    if isinstance(source, str) and source in DATASETS:
        splits = DATASETS[source]
        key = SPLIT_ALIASES.get(split, split)
        if key not in splits:
            raise DataError(f"dataset '{source}' has no split '{split}'; its splits: {sorted(splits)}")
        folder = data_dir()
        path = folder / splits[key]
        if not path.is_file():
            how = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else f"the repository's data folder (or set ${DATA_ENV})"
            raise DataError(f"bundled file for {source}/{split} not found: looked for {path} in {how}")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"'{source}' is neither a named dataset ({', '.join(DATASETS)}) nor an existing file")
    return path


def read_records(path: Path) -> list[Any]:
    """The raw records of a file: a JSON array (.json, .json.gz) or one JSON object per line (.jsonl, .jsonl.gz)."""
    name = path.name
    if not name.endswith(SUFFIXES):
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        what = "the compressed file is truncated" if isinstance(err, EOFError) else err
        raise DataError(f"{path}: cannot read the file ({what})") from err
    if name.endswith((".jsonl", ".jsonl.gz")):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_parse_json(line, path, f"line {number}"))
    else:
        records = _parse_json(text, path, "")
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _parse_json(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        place = where or f"line {err.lineno}"
        raise DataError(f"{path}: invalid JSON at {place}, column {err.colno}: {err.msg}") from err
    except RecursionError as err:
        raise DataError(f"{path}: the JSON{' at ' + where if where else ''} is nested too deeply to be records") from err


def skipped_indices(path: Path) -> frozenset[int]:
    """Indices of the records of ``path`` that the skip list next to it marks as known bad (empty if none)."""
    skip_list = path.parent / SKIP_LIST_NAME
    if not skip_list.is_file():
        return frozenset()
    try:
        entries = json.loads(skip_list.read_text(encoding="utf-8"))
        indices = entries.get(path.name, {}).get("indices", [])
        if not all(isinstance(i, int) for i in indices):
            raise TypeError("indices must be integers")
    except (ValueError, AttributeError, TypeError) as err:
        raise DataError(f"{skip_list}: malformed skip list ({err}); expected "
                        '{"<file name>": {"reason": "...", "indices": [0, 1, ...]}}') from err
    return frozenset(indices)
