"""The prediction log's database: which URLs it takes, its tables, its schema kept current with
Alembic, and the few queries the service and `pixclass feedback export` run.

SQLite (a file) and PostgreSQL (through psycopg 3, the `postgres` extra) are supported; the
inserts use their `ON CONFLICT` clauses, so a batch the writer sends again after a lost answer
(the database went away mid-commit) adds no row twice. Imported only when a log is asked for."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib.resources import files as package_files
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc

from ..errors import UserError, first_line

# not alembic's default name: the log may share a database with an application of its own
VERSION_TABLE = "pixclass_alembic_version"
DIALECTS = ("sqlite", "postgresql")
# how long opening a connection to PostgreSQL may take before the attempt counts as failed
CONNECT_TIMEOUT_S = 5

metadata = sa.MetaData()
predictions = sa.Table(  # as created by migrations/versions/0001_prediction_log.py
    "predictions", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_digest", sa.String(64), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("image_bytes", sa.Integer(), nullable=False),
    sa.Column("image", sa.LargeBinary(), nullable=True),
    sa.Column("predicted", sa.String(255), nullable=False),
    sa.Column("top_k", sa.JSON(), nullable=False),
    sa.Column("latency_ms", sa.Float(), nullable=False),
)
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("label", sa.String(255), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def database_url(text: str) -> sa.URL:
    """A SQLAlchemy URL. A plain path means a SQLite file; `postgresql://` means psycopg 3 (the
    driver pixclass installs), not SQLAlchemy's default psycopg2."""
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser()))
    try:
        url = sa.make_url(text)
    except exc.ArgumentError:
        raise UserError(f"not a database URL: {text!r} (e.g. sqlite:///predictions.db or "
                        "postgresql+psycopg://user@host/db)") from None
    if url.get_backend_name() not in DIALECTS:
        raise UserError(f"the prediction log supports SQLite and PostgreSQL URLs, not {url.get_backend_name()}")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def shown(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def open_engine(url: sa.URL) -> sa.Engine:
    """An engine whose pool checks a connection before handing it out, so that after the database
    restarts the next write reconnects instead of failing on a dead connection."""
    if url.get_backend_name() == "sqlite":
        # several service workers may write one file: wait for the lock rather than fail, and let
        # readers (GET /v1/predictions, export) read while the writer writes (WAL)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    except ModuleNotFoundError as e:
        raise UserError(f"a PostgreSQL prediction log needs psycopg ({e.name} is missing): "
                        "pip install 'pixclass[postgres]'") from None


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(engine: sa.Engine) -> None:
    """Create the tables, or bring them to the current schema (Alembic's `upgrade head`, with the
    migration scripts shipped inside pixclass)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(package_files("pixclass") / "serve" / "migrations"))
    with engine.begin() as connection:
        config.attributes.update(connection=connection, version_table=VERSION_TABLE)
        command.upgrade(config, "head")


def open_log(text: str, *, create: bool) -> sa.Engine:
    """The engine of the log at `text` (a URL or a SQLite path), reachable and at the current
    schema: created or migrated when `create`, else checked. A UserError (one line) when the
    database cannot be reached or holds no pixclass log."""
    url = database_url(text)
    if url.get_backend_name() == "sqlite" and not create:
        if not url.database or not Path(url.database).is_file():
            raise UserError(f"no such prediction log: {url.database or shown(url)}")
    from alembic.util import CommandError
    engine = open_engine(url)
    try:
        if create:
            migrate(engine)
        elif not sa.inspect(engine).has_table(predictions.name):
            raise UserError(f"{shown(url)} holds no pixclass prediction log "
                            "(`pixclass serve MODEL --log-db URL` creates one)")
    except exc.SQLAlchemyError as e:
        engine.dispose()
        raise UserError(f"prediction log {shown(url)}: {first_line(getattr(e, 'orig', None) or e)}") from None
    except CommandError as e:  # e.g. a revision this pixclass does not know: written by a newer one
        engine.dispose()
        raise UserError(f"prediction log {shown(url)}: {first_line(e)} (a newer pixclass's schema?)") from None
    return engine


def is_transient(error: BaseException) -> bool:
    """Whether retrying may succeed: the database is away, restarting or locked (not rows it refuses)."""
    return isinstance(error, (exc.OperationalError, exc.InterfaceError)) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated)


def _insert(connection, table):
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def insert_predictions(engine: sa.Engine, rows: list[dict]) -> None:
    """One transaction; rows whose id is already there (a batch sent again) are skipped."""
    with engine.begin() as connection:
        connection.execute(_insert(connection, predictions).on_conflict_do_nothing(index_elements=["id"]), rows)


def record_feedback(engine: sa.Engine, prediction_id: str, label: str) -> str | None:
    """Store `label` as the correct class of the prediction (replacing an earlier one); its
    predicted class, or None when the log has no such prediction."""
    with engine.begin() as connection:
        predicted = connection.scalar(sa.select(predictions.c.predicted).where(predictions.c.id == prediction_id))
        if predicted is None:
            return None
        row = {"prediction_id": prediction_id, "label": label, "created_at": now()}
        statement = _insert(connection, feedback).values(row)
        connection.execute(statement.on_conflict_do_update(
            index_elements=["prediction_id"], set_={"label": label, "created_at": row["created_at"]}))
    return predicted


def page(engine: sa.Engine, limit: int, before: int | None) -> tuple[list[dict], int | None]:
    """Up to `limit` predictions, newest first, older than the one numbered `before`; and the
    number to pass as `before` for the next page (None after the last)."""
    p = predictions
    query = (sa.select(p.c.seq, p.c.id, p.c.request_id, p.c.created_at, p.c.model_digest, p.c.filename,
                       p.c.image_sha256, p.c.image_bytes, p.c.image.is_not(None).label("image_stored"),
                       p.c.predicted, p.c.top_k, p.c.latency_ms, feedback.c.label.label("feedback"))
             .outerjoin(feedback, feedback.c.prediction_id == p.c.id).order_by(p.c.seq.desc()).limit(limit + 1))
    if before is not None:
        query = query.where(p.c.seq < before)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(query)]
    more = len(rows) > limit
    rows = rows[:limit]
    for row in rows:
        row["created_at"] = as_utc(row["created_at"]).isoformat()
        row["image_stored"] = bool(row["image_stored"])
    return [{k: v for k, v in r.items() if k != "seq"} for r in rows], (rows[-1]["seq"] if more else None)


def now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back the stored UTC time without its zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
