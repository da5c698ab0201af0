"""`pixclass feedback export`: the corrected images of a prediction log as class folders, ready
for `pixclass train`.

A corrected image is one whose prediction got feedback (POST /v1/feedback) and whose bytes the
log holds (`--log-images`). Files are named by the image's SHA-256, so an image predicted and
corrected several times is written once (a duplicate across a training run's splits would leak
test images into training), under the class of its latest correction. Nothing is overwritten: a
file already there is kept and counted, so exporting again into the same folder adds only what
is new."""

from __future__ import annotations

import errno
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic_write import describe_os_error
from ..data.decode import ALLOWED_FORMATS
from ..errors import UserError

SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif"}
FETCH_ROWS = 100  # images read from the database at a time


@dataclass
class ExportResult:
    out_dir: str
    written: dict[str, int] = field(default_factory=dict)  # class -> files written
    already_there: int = 0
    without_image: int = 0  # corrected images whose bytes the log does not hold


def export_corrections(log_url: str, out_dir) -> ExportResult:
    from . import log_db
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder to write the class folders into")
    engine = log_db.open_log(log_url, create=False)
    try:
        labels, stored = _latest_corrections(engine)
        result = ExportResult(str(out), without_image=sum(1 for sha in labels if sha not in stored))
        for label in sorted(set(labels.values())):
            _check_folder_name(label)
        for seq, sha, data in _images(engine, {stored[sha]: sha for sha in labels if sha in stored}):
            label = labels[sha]
            if _write_new(out / label / (sha[:16] + _suffix(data)), data):
                result.written[label] = result.written.get(label, 0) + 1
            else:
                result.already_there += 1
    finally:
        engine.dispose()
    return result


def _latest_corrections(engine) -> tuple[dict[str, str], dict[str, int]]:
    """image SHA-256 -> the class of its latest correction; and -> a logged prediction holding
    its bytes."""
    import sqlalchemy as sa

    from .log_db import feedback, predictions as p
    query = (sa.select(p.c.image_sha256, p.c.seq, p.c.image.is_not(None), feedback.c.label)
             .join(feedback, feedback.c.prediction_id == p.c.id).order_by(feedback.c.created_at, p.c.seq))
    labels, stored = {}, {}
    with engine.connect() as connection:
        for sha, seq, has_image, label in connection.execute(query):
            labels[sha] = label
            if has_image:
                stored[sha] = seq
    return labels, stored


def _images(engine, sha_by_seq: dict[int, str]):
    """(seq, sha, bytes) of the given predictions, a few at a time (images can be large)."""
    import sqlalchemy as sa

    from .log_db import predictions as p
    seqs = sorted(sha_by_seq)
    with engine.connect() as connection:
        for i in range(0, len(seqs), FETCH_ROWS):
            chunk = seqs[i:i + FETCH_ROWS]
            for seq, data in connection.execute(sa.select(p.c.seq, p.c.image).where(p.c.seq.in_(chunk))):
                yield seq, sha_by_seq[seq], data


def _check_folder_name(label: str) -> None:
    if label in ("", ".", "..") or any(c in label for c in "/\\\0"):
        raise UserError(f"the class {label!r} cannot be a folder name; nothing was written")


def _suffix(data: bytes) -> str:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            return SUFFIXES.get(image.format, "")
    except Exception:  # logged only after it decoded for its prediction: never expected
        return ""


def _write_new(path: Path, data: bytes) -> bool:
    """Write `path` whole unless it exists (never replaced); whether it was written."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # unlike a rename, fails rather than replace a file made meanwhile
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(path, "xb") as f:  # a file system without hard links
                f.write(data)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise UserError(f"{describe_os_error(e)} while writing {path}") from None
    finally:
        tmp.unlink(missing_ok=True)
