"""Prediction records written to a file as they come, in the format its suffix names: .csv, .jsonl
or .parquet. A record is {"path", "answer", "unknown", "score", "top_k": [{"class", "probability"}, ...]}
for an image (predict.answer), or {"path", "error"} for a file that could not be read. A
multi-label model's "answer" is every label above its threshold, space-separated (JSONL adds them as
a "labels" list), and its probabilities are each label's own.

Each batch is written with one write and flushed, so a killed run loses at most the batch being
written. A CSV or JSONL file can be continued (`--resume`): its complete lines say which files are
done, and a last line without its newline (a write cut short) is dropped before appending. A
Parquet file is only readable once closed (its footer comes last), so it cannot be continued.

Under torchrun every rank writes its own part file beside the output; `merge` puts the output and
the parts together in the order of the file list and removes the parts."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .errors import UserError

SUFFIXES = (".csv", ".jsonl", ".parquet")
PART_MARK = ".part-"


def _probability(p: float) -> float:
    # six decimals: what the CSV has always shown, and a JSON number that reads back unchanged
    return round(float(p), 6)


class _LineFormat:
    """A text format with one record per line (CSV, JSONL)."""

    resumable = True

    def header(self, k: int) -> str:
        return ""

    def line(self, record: dict, k: int) -> str:
        raise NotImplementedError

    def path_of(self, line: str) -> str:
        raise NotImplementedError

    def open_writer(self, path: Path, k: int, append: bool) -> "_LineWriter":
        return _LineWriter(self, path, k, append)

    def complete_lines(self, path: Path, k: int | None = None) -> list[str]:
        """The file's record lines that end in a newline (the header checked against `k` and left out)."""
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a prediction file pixclass wrote (not UTF-8 text); "
                            f"write to a new --out") from None
        lines = text[:text.rfind("\n") + 1].splitlines(keepends=True)
        head = self.header(k) if k is not None else ""
        if lines and head and k is not None and lines[0] != head:
            raise UserError(f"{path} has other columns than a --top-k {k} run writes; resume with the "
                            f"--top-k it was written with, or write to a new --out")
        return lines[1:] if lines and self.is_header(lines[0]) else lines

    def is_header(self, line: str) -> bool:
        return False

    def done_paths(self, path: Path, k: int) -> list[str]:
        lines = self.complete_lines(path, k)
        try:
            return [self.path_of(line) for line in lines]
        except (ValueError, KeyError, TypeError, StopIteration) as e:
            raise UserError(f"{path} is not a prediction file pixclass wrote ({type(e).__name__}: {e}); "
                            f"write to a new --out") from None

    def drop_partial_line(self, path: Path) -> None:
        """Cut a last line that lacks its newline (the write a kill interrupted)."""
        if not path.is_file():
            return
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            start = block_end = end
            while start > 0:  # back from the end, a block at a time, to the last newline
                start = max(0, block_end - (1 << 16))
                f.seek(start)
                newline = f.read(block_end - start).rfind(b"\n")
                if newline >= 0:
                    start += newline + 1
                    break
                block_end = start
            if start < end:
                f.truncate(start)

    def merge(self, sources: list[Path], dest: Path, k: int, position: dict[str, int]) -> int:
        """The records of `sources` (complete lines only), each path once, in `position` order, written
        to `dest` whole (a temporary file renamed over it). Returns how many records."""
        seen, keyed = set(), []
        for source in sources:
            for line in self.complete_lines(source):
                path = self.path_of(line)
                if path not in seen:
                    seen.add(path)
                    keyed.append((position.get(path, len(position)), len(keyed), line))
        keyed.sort()
        tmp = dest.with_name(dest.name + ".merging")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(self.header(k))
            f.writelines(line for _, _, line in keyed)
        os.replace(tmp, dest)
        return len(keyed)


class _LineWriter:
    def __init__(self, fmt: _LineFormat, path: Path, k: int, append: bool):
        self.fmt, self.k = fmt, k
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "w" if fresh else "a", encoding="utf-8", newline="")
        if fresh:
            self.file.write(fmt.header(k))
            self.file.flush()

    def write(self, records: list[dict]) -> None:
        self.file.write("".join(self.fmt.line(r, self.k) for r in records))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CsvFormat(_LineFormat):
    """path, class, probability (the top class), then class_2, probability_2, ... up to k, answer (the
    top class or "unknown"), score (the abstain score; empty without a threshold), and error."""

    def columns(self, k: int) -> list[str]:
        rest = [f"{name}_{i}" for i in range(2, k + 1) for name in ("class", "probability")]
        return ["path", "class", "probability", *rest, "answer", "score", "error"]

    def _row(self, values: list) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue()

    def header(self, k: int) -> str:
        return self._row(self.columns(k))

    def is_header(self, line: str) -> bool:
        return line.startswith("path,class,probability,")

    def line(self, record: dict, k: int) -> str:
        if "error" in record:
            return self._row([record["path"], *[""] * (2 * k + 2), record["error"]])
        cells = [v for c in record["top_k"] for v in (c["class"], f"{c['probability']:.6f}")]
        score = "" if record["score"] is None else f"{record['score']:.6f}"
        return self._row([record["path"], *cells, *[""] * (2 * k - len(cells)), record["answer"], score, ""])

    def path_of(self, line: str) -> str:
        return next(csv.reader([line]))[0]


class JsonlFormat(_LineFormat):
    def line(self, record: dict, k: int) -> str:
        if "error" not in record:
            score = None if record["score"] is None else _probability(record["score"])
            labels = {"labels": record["labels"]} if "labels" in record else {}
            record = {"path": record["path"], "answer": record["answer"], **labels, "unknown": record["unknown"],
                      "score": score, "top_k": [{"class": c["class"], "probability": _probability(c["probability"])}
                                                for c in record["top_k"]]}
        return json.dumps(record, ensure_ascii=False) + "\n"

    def path_of(self, line: str) -> str:
        return json.loads(line)["path"]


class ParquetFormat:
    """The CSV's columns in a Parquet file (pyarrow), one row group per batch."""

    resumable = False

    def __init__(self):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("--out FILE.parquet needs the pyarrow package (pip install pyarrow); "
                            "or write .csv or .jsonl") from None

    def _schema(self, k: int):
        import pyarrow as pa
        fields = [pa.field("path", pa.string())]
        for i in range(1, k + 1):
            suffix = "" if i == 1 else f"_{i}"
            fields += [pa.field(f"class{suffix}", pa.string()), pa.field(f"probability{suffix}", pa.float64())]
        return pa.schema(fields + [pa.field("answer", pa.string()), pa.field("score", pa.float64()),
                                   pa.field("error", pa.string())])

    def open_writer(self, path: Path, k: int, append: bool) -> "_ParquetWriter":
        return _ParquetWriter(self, path, k)

    def rows(self, records: list[dict], k: int) -> dict[str, list]:
        names = self._schema(k).names
        columns = {name: [] for name in names}
        for r in records:
            values = [r["path"]]
            for i in range(k):
                top = r.get("top_k", [])
                c = top[i] if i < len(top) else None
                values += [c["class"], _probability(c["probability"])] if c else [None, None]
            score = r.get("score")
            values += [r.get("answer"), None if score is None else _probability(score), r.get("error")]
            for name, v in zip(names, values):
                columns[name].append(v)
        return columns

    def merge(self, sources: list[Path], dest: Path, k: int, position: dict[str, int]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.concat_tables([pq.read_table(s) for s in sources if s.is_file()])
        order = [position.get(p, len(position)) for p in table.column("path").to_pylist()]
        table = table.take(pa.array(sorted(range(len(order)), key=lambda i: (order[i], i)), pa.int64()))
        tmp = dest.with_name(dest.name + ".merging")
        pq.write_table(table, tmp)
        os.replace(tmp, dest)
        return table.num_rows


class _ParquetWriter:
    def __init__(self, fmt: ParquetFormat, path: Path, k: int):
        import pyarrow.parquet as pq
        self.fmt, self.k, self.schema = fmt, k, fmt._schema(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, records: list[dict]) -> None:
        import pyarrow as pa
        self.writer.write_table(pa.Table.from_pydict(self.fmt.rows(records, self.k), schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def output_format(path: Path):
    """The format `path`'s suffix names; a user error for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return CsvFormat()
    if suffix == ".jsonl":
        return JsonlFormat()
    if suffix == ".parquet":
        return ParquetFormat()
    raise UserError(f"--out must end in {', '.join(SUFFIXES)} (the suffix sets the format; got {Path(path).name!r})")


def part_path(out: Path, rank: int) -> Path:
    """Rank `rank`'s part of `out` (same suffix, so it is read back with the same format)."""
    return out.with_name(f"{out.name}{PART_MARK}{rank:05d}{out.suffix}")


def existing_parts(out: Path) -> list[Path]:
    """Part files left beside `out` by this or an earlier (perhaps killed, perhaps wider) run."""
    return sorted(p for p in out.parent.glob(f"{out.name}{PART_MARK}*{out.suffix}")
                  if not p.name.endswith(".merging"))
