"""Finding a file-based data set under ``data.root`` and reporting what is missing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedtier.errors import DataError


def require_root(dataset: str, root: str | None, how: str) -> Path:
    """``root`` as an existing folder; a :class:`DataError` saying how to get the data otherwise."""
    if root is None:
        raise DataError(
            f"data set '{dataset}' is read from local files but data.root is not set. {how}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data.root '{root}' (data set '{dataset}') is not an existing folder. {how}"
        )
    return path


def locate(
    dataset: str, dirs: Sequence[Path], files: Sequence[str], how: str, gz: bool = False
) -> dict[str, Path]:
    """Paths of ``files`` in the first folder of ``dirs`` that holds all of them.

    With ``gz`` each file may also be present with a ``.gz`` suffix (the plain file wins).
    Raises a :class:`DataError` naming the missing files and every folder searched.
    """
    found = [{f: _variant(d, f, gz) for f in files} for d in dirs]
    for hits in found:
        if all(hits.values()):
            return {f: p for f, p in hits.items() if p is not None}
    best, hits = max(
        zip(dirs, found), key=lambda pair: sum(p is not None for p in pair[1].values())
    )
    missing = ", ".join(f + ("[.gz]" if gz else "") for f, p in hits.items() if p is None)
    searched = ", ".join(str(d) for d in dirs)
    raise DataError(
        f"data set '{dataset}': missing {missing} in {best} (searched {searched}). {how}"
    )


def _variant(folder: Path, name: str, gz: bool) -> Path | None:
    for candidate in (name, name + ".gz") if gz else (name,):
        if (folder / candidate).is_file():
            return folder / candidate
    return None
