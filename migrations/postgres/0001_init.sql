-- tierstore warm schema for PostgreSQL.
--
-- Every (thread, namespace) is one row of tierstore_heads, which also gives it a
-- small surrogate key (sid). The other tables are keyed by sid instead of the
-- thread id and namespace, so a long thread id is stored once per namespace
-- rather than in every checkpoint, blob, write and index entry.
--
-- Ids are compared as bytes (COLLATE "C"): the greatest checkpoint id is the
-- head, exactly as in the SQLite tier and in Python.

-- The unique key of a (thread, namespace). Thread ids may be up to 64 KiB, far
-- past what a btree entry holds, so the index is built over a SHA-224 digest of
-- the UTF-8 bytes. convert_to is only STABLE because conversions could be
-- redefined; conversion to UTF-8 of a database's own text never changes.
-- Lookups compare tierstore_key(column) with the same expression written out
-- (sha224(convert_to(x, 'UTF8'))), which matches the index without paying for
-- a call to this function on every query.
CREATE FUNCTION tierstore_key(text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT pg_catalog.sha224(pg_catalog.convert_to($1, 'UTF8')) $$;

-- head_id is NULL while a namespace has pending writes but no checkpoint.
-- lease_owner / lease_until (epoch seconds on the workers' clock) lease the
-- namespace to one tiering worker. Fixed-width columns first (no alignment
-- padding). Only sid and the two ids are indexed, and fillfactor leaves room on
-- each page, so the update done by every put stays a HOT update; tiering claims
-- scan this table (one row per namespace) instead of an index on updated_at.
CREATE TABLE tierstore_heads (
    sid           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version       bigint      NOT NULL DEFAULT 0,
    conflicts     bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    lease_until   double precision,
    n_writes      integer     NOT NULL DEFAULT 0,
    thread_id     text COLLATE "C" NOT NULL,
    checkpoint_ns text COLLATE "C" NOT NULL,
    head_id       text COLLATE "C",
    lease_owner   text
) WITH (fillfactor = 70);

CREATE UNIQUE INDEX tierstore_heads_key
    ON tierstore_heads (tierstore_key(thread_id), tierstore_key(checkpoint_ns));

-- A checkpoint is archived exactly when archive_key is set: the row is then a
-- stub whose checkpoint payload lives in the cold segment archive_key names,
-- while metadata, parent and channel_versions stay for list and its filters.
-- accessed_at stays NULL until a read is recorded. channel_versions joins the
-- blobs (its versions in the stored form, see _version_key in the module);
-- filter_doc holds the top-level scalar metadata for list filters.
CREATE TABLE tierstore_checkpoints (
    sid              bigint      NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    accessed_at      timestamptz,
    size_bytes       integer     NOT NULL,
    checkpoint_id    text COLLATE "C" NOT NULL,
    parent_id        text COLLATE "C",
    run_id           text COLLATE "C",
    checkpoint_tag   text,
    checkpoint       bytea,
    metadata_tag     text        NOT NULL,
    metadata         bytea       NOT NULL,
    channel_versions jsonb       NOT NULL,
    filter_doc       jsonb       NOT NULL,
    archive_key      text,
    PRIMARY KEY (sid, checkpoint_id)
);

-- Every index is partial or compact where it can be: bytes per checkpoint count.
-- The GIN index is updated in place (no pending list): smaller, and no put pays
-- for flushing everyone's pending entries. Demotion finds live checkpoints by
-- age; stubs are counted per segment by the archive's garbage collector.
CREATE INDEX tierstore_checkpoints_run_id
    ON tierstore_checkpoints (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX tierstore_checkpoints_filter
    ON tierstore_checkpoints USING gin (filter_doc jsonb_path_ops) WITH (fastupdate = off);
CREATE INDEX tierstore_checkpoints_live_age
    ON tierstore_checkpoints (created_at) WHERE archive_key IS NULL;
CREATE INDEX tierstore_checkpoints_archive_key
    ON tierstore_checkpoints (archive_key) WHERE archive_key IS NOT NULL;

-- One row per (namespace, channel, version): a value unchanged across
-- checkpoints is stored once.
CREATE TABLE tierstore_blobs (
    sid     bigint NOT NULL,
    channel text COLLATE "C" NOT NULL,
    version text COLLATE "C" NOT NULL,
    tag     text   NOT NULL,
    data    bytea  NOT NULL,
    PRIMARY KEY (sid, channel, version)
);

CREATE TABLE tierstore_writes (
    sid           bigint  NOT NULL,
    idx           integer NOT NULL,
    checkpoint_id text COLLATE "C" NOT NULL,
    task_id       text COLLATE "C" NOT NULL,
    channel       text    NOT NULL,
    tag           text    NOT NULL,
    data          bytea   NOT NULL,
    task_path     text    NOT NULL DEFAULT '',
    PRIMARY KEY (sid, checkpoint_id, task_id, idx)
);

-- Store a checkpoint, its new blobs, and advance the head, in one call.
--
-- The head row is locked (FOR NO KEY UPDATE, so concurrent put_writes, which
-- only take KEY SHARE, are not blocked) and compared with p_parent under that
-- lock; a strict put whose parent is not the head returns o_ok = false having
-- written nothing. Writers of different namespaces never wait for each other.
CREATE FUNCTION tierstore_put_checkpoint(
    p_thread text, p_ns text, p_id text, p_parent text, p_strict boolean,
    p_run_id text, p_checkpoint_tag text, p_checkpoint bytea,
    p_metadata_tag text, p_metadata bytea, p_channel_versions jsonb, p_filter_doc jsonb,
    p_size integer, p_channels text[], p_versions text[], p_tags text[], p_data bytea[],
    OUT o_ok boolean, OUT o_head text, OUT o_version bigint, OUT o_n_writes integer,
    OUT o_conflict boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_sid bigint;
BEGIN
    LOOP
        SELECT h.sid, h.head_id, h.version, h.n_writes
          INTO v_sid, o_head, o_version, o_n_writes
          FROM tierstore_heads AS h
         WHERE tierstore_key(h.thread_id) = sha224(convert_to(p_thread, 'UTF8'))
           AND tierstore_key(h.checkpoint_ns) = sha224(convert_to(p_ns, 'UTF8'))
           AND h.thread_id = p_thread AND h.checkpoint_ns = p_ns
           FOR NO KEY UPDATE;
        EXIT WHEN FOUND;
        IF p_strict AND p_parent IS NOT NULL THEN
            o_ok := false; o_head := NULL; o_version := 0; o_n_writes := 0; o_conflict := true;
            RETURN;
        END IF;
        -- A concurrent first writer may win this insert; then lock its row.
        INSERT INTO tierstore_heads (thread_id, checkpoint_ns) VALUES (p_thread, p_ns)
        ON CONFLICT DO NOTHING
        RETURNING sid, head_id, version, n_writes INTO v_sid, o_head, o_version, o_n_writes;
        EXIT WHEN FOUND;
    END LOOP;

    o_conflict := o_head IS DISTINCT FROM p_parent;
    IF p_strict AND o_conflict THEN
        o_ok := false;
        RETURN;
    END IF;

    INSERT INTO tierstore_blobs (sid, channel, version, tag, data)
    SELECT v_sid, u.channel, u.version, u.tag, u.data
      FROM unnest(p_channels, p_versions, p_tags, p_data) AS u(channel, version, tag, data)
    ON CONFLICT DO NOTHING;

    INSERT INTO tierstore_checkpoints AS c (
        sid, size_bytes, checkpoint_id, parent_id, run_id, checkpoint_tag, checkpoint,
        metadata_tag, metadata, channel_versions, filter_doc)
    VALUES (v_sid, p_size, p_id, p_parent, p_run_id, p_checkpoint_tag, p_checkpoint,
            p_metadata_tag, p_metadata, p_channel_versions, p_filter_doc)
    ON CONFLICT (sid, checkpoint_id) DO UPDATE SET
        created_at = now(), accessed_at = NULL, size_bytes = excluded.size_bytes,
        parent_id = excluded.parent_id, run_id = excluded.run_id,
        checkpoint_tag = excluded.checkpoint_tag, checkpoint = excluded.checkpoint,
        metadata_tag = excluded.metadata_tag, metadata = excluded.metadata,
        channel_versions = excluded.channel_versions, filter_doc = excluded.filter_doc,
        archive_key = NULL;

    IF o_head IS NULL OR p_id COLLATE "C" >= o_head THEN
        o_head := p_id;
        SELECT count(*) INTO o_n_writes
          FROM tierstore_writes AS w
         WHERE w.sid = v_sid AND w.checkpoint_id = p_id;
    END IF;
    o_version := o_version + 1;
    UPDATE tierstore_heads AS h
       SET head_id = o_head, version = o_version, n_writes = o_n_writes,
           conflicts = h.conflicts + o_conflict::integer, updated_at = now()
     WHERE h.sid = v_sid;
    o_ok := true;
END
$$;

-- Store pending writes against one checkpoint, in one call; returns how many
-- rows were new. idx >= 0 keeps the first write per (task_id, idx); idx < 0
-- (errors, interrupts, resumes) replaces. Only newly inserted rows are added to
-- the head's n_writes (xmax = 0 tells an insert from an update), so concurrent
-- callers compose. The caller sends each (task_id, idx) at most once.
CREATE FUNCTION tierstore_put_writes(
    p_thread text, p_ns text, p_id text,
    p_task_ids text[], p_idxs integer[], p_channels text[], p_tags text[], p_data bytea[],
    p_paths text[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_sid bigint;
    v_new integer;
BEGIN
    LOOP
        -- KEY SHARE keeps the namespace from being deleted under us without
        -- waiting for a concurrent put_checkpoint.
        SELECT h.sid INTO v_sid
          FROM tierstore_heads AS h
         WHERE tierstore_key(h.thread_id) = sha224(convert_to(p_thread, 'UTF8'))
           AND tierstore_key(h.checkpoint_ns) = sha224(convert_to(p_ns, 'UTF8'))
           AND h.thread_id = p_thread AND h.checkpoint_ns = p_ns
           FOR KEY SHARE;
        EXIT WHEN FOUND;
        INSERT INTO tierstore_heads (thread_id, checkpoint_ns) VALUES (p_thread, p_ns)
        ON CONFLICT DO NOTHING
        RETURNING sid INTO v_sid;
        EXIT WHEN FOUND;
    END LOOP;

    WITH rows AS (
        SELECT * FROM unnest(p_task_ids, p_idxs, p_channels, p_tags, p_data, p_paths)
            AS u(task_id, idx, channel, tag, data, task_path)
    ), kept AS (
        INSERT INTO tierstore_writes AS w
            (sid, idx, checkpoint_id, task_id, channel, tag, data, task_path)
        SELECT v_sid, r.idx, p_id, r.task_id, r.channel, r.tag, r.data, r.task_path
          FROM rows AS r WHERE r.idx >= 0
        ON CONFLICT DO NOTHING
        RETURNING 1
    ), replaced AS (
        INSERT INTO tierstore_writes AS w
            (sid, idx, checkpoint_id, task_id, channel, tag, data, task_path)
        SELECT v_sid, r.idx, p_id, r.task_id, r.channel, r.tag, r.data, r.task_path
          FROM rows AS r WHERE r.idx < 0
        ON CONFLICT (sid, checkpoint_id, task_id, idx) DO UPDATE SET
            channel = excluded.channel, tag = excluded.tag, data = excluded.data,
            task_path = excluded.task_path
        RETURNING (w.xmax = 0) AS inserted
    )
    SELECT (SELECT count(*) FROM kept) + (SELECT count(*) FROM replaced WHERE inserted)
      INTO v_new;

    IF v_new > 0 THEN
        UPDATE tierstore_heads AS h SET n_writes = h.n_writes + v_new
         WHERE h.sid = v_sid AND h.head_id = p_id;
    END IF;
    RETURN v_new;
END
$$;
