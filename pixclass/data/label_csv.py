"""Labels from a CSV file instead of class folders: one row per image, `path,label`, paths relative
to the CSV's own folder (or absolute); an optional `split` column (train, val, test) fixes the
split of each row, as split folders do.

Multi-label: a label cell may hold several space-separated tags (`img.jpg,"cat dog"`); a CSV with at
least one such cell is a multi-label dataset (every image may have any number of its tags), so tag
names cannot contain spaces there. A row's label is kept as its tags, sorted and each once,
joined by one space."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError

_PATH_COLUMNS = ("path", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "class")
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class LabelRow:
    path: Path
    label: str  # a multi-label row's tags, sorted, joined by one space
    split: str | None  # None: the scan assigns one

    @property
    def tags(self) -> list[str]:
        return self.label.split(" ")


def is_multilabel(rows: list[LabelRow]) -> bool:
    """Whether a label CSV's rows make a multi-label dataset: some row has several tags."""
    return any(" " in r.label for r in rows)


def tags_of(label: str) -> str:
    """A label cell as the row keeps it: its whitespace-separated tags, sorted, each once."""
    return " ".join(sorted(set(label.split())))


def is_label_csv(path) -> bool:
    p = Path(path).expanduser()
    return p.suffix.lower() == ".csv" and p.is_file()


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    return next((lowered.index(n) for n in names if n in lowered), None)


def read_label_csv(path) -> list[LabelRow]:
    """The rows of a label CSV, checked: a header naming the path and label columns, every file
    present, no file listed twice with different labels."""
    path = Path(path).expanduser()
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read the label CSV {path}: {e}") from None
    if not rows:
        raise DatasetError(f"{path} is empty: expected a header 'path,label' and one row per image")
    header, body = rows[0], rows[1:]
    i_path, i_label = _column(header, _PATH_COLUMNS), _column(header, _LABEL_COLUMNS)
    if i_path is None or i_label is None:
        raise DatasetError(f"{path}: the first row must name the columns, e.g. 'path,label' "
                           f"(found {','.join(header)[:80]!r})")
    i_split = _column(header, ("split",))
    out: dict[Path, LabelRow] = {}
    missing = []
    for line, row in enumerate(body, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(i_path, i_label):
            raise DatasetError(f"{path}, line {line}: expected at least {max(i_path, i_label) + 1} columns")
        file, label = row[i_path].strip(), tags_of(row[i_label])
        if not file or not label:
            raise DatasetError(f"{path}, line {line}: empty path or label")
        split = None
        if i_split is not None and i_split < len(row) and row[i_split].strip():
            split = _SPLIT_NAMES.get(row[i_split].strip().lower())
            if split is None:
                raise DatasetError(f"{path}, line {line}: unknown split {row[i_split]!r} (train, val or test)")
        p = (base / file).expanduser()
        if not p.is_file():
            missing.append(file)
            continue
        previous = out.get(p)
        if previous is not None and previous.label != label:
            raise DatasetError(f"{path}, line {line}: {file} is listed with two labels "
                               f"({previous.label!r} and {label!r})")
        out[p] = LabelRow(p, label, split)
    if missing:
        raise DatasetError(f"{path}: {len(missing)} listed file(s) not found relative to {base} "
                           f"(e.g. {missing[0]})")
    if not out:
        raise DatasetError(f"{path} lists no images")
    return list(out.values())
