-- tierstore warm schema for SQLite (embedded stack).
-- heads: one row per (thread, ns); version increases with every checkpoint,
-- n_writes counts the pending writes stored against the head checkpoint.
CREATE TABLE IF NOT EXISTS heads (
    thread_id     TEXT    NOT NULL,
    checkpoint_ns TEXT    NOT NULL,
    head_id       TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    n_writes      INTEGER NOT NULL DEFAULT 0,
    conflicts     INTEGER NOT NULL DEFAULT 0,
    updated_at    REAL    NOT NULL,
    lease_owner   TEXT,
    lease_until   REAL,
    PRIMARY KEY (thread_id, checkpoint_ns)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS heads_updated_at ON heads (updated_at);

-- location: 'warm' (payload here) or 'archived' (payload in cold, row is a stub).
CREATE TABLE IF NOT EXISTS checkpoints (
    thread_id        TEXT    NOT NULL,
    checkpoint_ns    TEXT    NOT NULL,
    checkpoint_id    TEXT    NOT NULL,
    parent_id        TEXT,
    run_id           TEXT,
    checkpoint_tag   TEXT,
    checkpoint       BLOB,
    metadata_tag     TEXT    NOT NULL,
    metadata         BLOB    NOT NULL,
    channel_versions TEXT    NOT NULL,
    filter_doc       TEXT    NOT NULL,
    location         TEXT    NOT NULL DEFAULT 'warm',
    archive_key      TEXT,
    created_at       REAL    NOT NULL,
    accessed_at      REAL    NOT NULL,
    size_bytes       INTEGER NOT NULL,
    PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS checkpoints_run_id ON checkpoints (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS checkpoints_by_id ON checkpoints (checkpoint_id);
CREATE INDEX IF NOT EXISTS checkpoints_location ON checkpoints (location, created_at);
CREATE INDEX IF NOT EXISTS checkpoints_archive_key ON checkpoints (archive_key)
    WHERE archive_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS blobs (
    thread_id     TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    channel       TEXT NOT NULL,
    version       TEXT NOT NULL,
    tag           TEXT NOT NULL,
    data          BLOB NOT NULL,
    PRIMARY KEY (thread_id, checkpoint_ns, channel, version)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS writes (
    thread_id     TEXT    NOT NULL,
    checkpoint_ns TEXT    NOT NULL,
    checkpoint_id TEXT    NOT NULL,
    task_id       TEXT    NOT NULL,
    idx           INTEGER NOT NULL,
    channel       TEXT    NOT NULL,
    tag           TEXT    NOT NULL,
    data          BLOB    NOT NULL,
    task_path     TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
) WITHOUT ROWID;
