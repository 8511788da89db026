"""Opening a user's dataset through Hugging Face `datasets`: a hub id, a `save_to_disk` folder, or
a .jsonl / .json / .parquet file. Training problems and preference pairs both come through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.data.records import DataError

FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def is_single_file(source: str) -> bool:
    """A local file holds one split only (whatever split is asked, it is read)."""
    return Path(source).is_file()


def open_dataset(source: str, split: str, what: str) -> Any:
    """The `split` of `source` as a `datasets.Dataset`; one-line DataError naming `what` otherwise."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        if path.is_file():
            kind = FILE_KINDS.get(path.suffix)
            if kind is None:
                raise DataError(
                    f"{source}: unsupported file type (use .jsonl, .json, .parquet or a dataset folder)"
                )
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as err:  # network, auth, a renamed dataset, a malformed file: one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load {what} {source} ({split}): {reason}") from None


def require_fields(ds: Any, source: str, split: str, fields: list[str]) -> None:
    for name in fields:
        if name not in ds.column_names:
            raise DataError(f"{source} ({split}): no field '{name}' (fields: {', '.join(ds.column_names)})")
