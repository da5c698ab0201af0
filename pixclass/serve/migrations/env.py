"""Alembic's environment for the prediction log: run by `log_db.migrate` on a connection it
opens itself (there is no alembic.ini; pixclass never runs alembic's command line)."""

from alembic import context

attributes = context.config.attributes
context.configure(connection=attributes["connection"], version_table=attributes["version_table"],
                  render_as_batch=True)  # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
