-- The check that a put names only channel versions warm holds, at a cost that does
-- not grow with the thread.
--
-- 0005 wrote the check as one statement with four NOT EXISTS; the planner turned the
-- blob probe into a hash of every blob row of the namespace, read on every put, and
-- probed the parent's channel_versions once per channel. The same four tests now run
-- cheapest first, each only on what the one before left: the parent (read once: a
-- checkpoint's unchanged channels are named by its live parent, so this settles
-- almost every channel), the new blobs, one primary-key probe per remaining channel,
-- and, only when a channel is still unaccounted for, the namespace's other live
-- checkpoints. What is refused, what is stored and what is returned are unchanged:
-- a version is missing exactly when none of the four holds it, as before.
--
-- Same signature as in 0001, so the fenced wrapper of 0002 calls this body.
CREATE OR REPLACE FUNCTION tierstore_put_checkpoint(
    p_thread text, p_ns text, p_id text, p_parent text, p_strict boolean,
    p_run_id text, p_checkpoint_tag text, p_checkpoint bytea,
    p_metadata_tag text, p_metadata bytea, p_channel_versions jsonb, p_filter_doc jsonb,
    p_size integer, p_channels text[], p_versions text[], p_tags text[], p_data bytea[],
    OUT o_ok boolean, OUT o_head text, OUT o_version bigint, OUT o_n_writes integer,
    OUT o_conflict boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_sid bigint;
    v_parent jsonb;
    v_unheld text[];
    v_missing jsonb;
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

    -- Under the head row's lock (mark_archived takes it too): every channel version
    -- the checkpoint names must be among its new blobs or still held, by a blob row
    -- or, for an empty channel (no row), by a live checkpoint naming it. A live
    -- checkpoint's versions are all held (an archive move keeps every blob a live
    -- checkpoint names), so the live parent answers first, for all channels at once.
    -- The liveness tests sit in the select list, not in WHERE: there they would let
    -- the planner pick the partial index of live checkpoints (every namespace's) over
    -- the primary key, and a plan cached while the table was small keeps that choice.
    IF p_parent IS NOT NULL THEN
        SELECT CASE WHEN c.archive_key IS NULL THEN c.channel_versions END INTO v_parent
          FROM tierstore_checkpoints AS c
         WHERE c.sid = v_sid AND c.checkpoint_id = p_parent;
    END IF;
    -- OFFSET 0 keeps the blob probe above the cheap tests (a primary-key lookup per
    -- channel left), where the planner would otherwise hash the namespace's blobs.
    SELECT array_agg(r.channel) INTO v_unheld
      FROM (SELECT v.channel, v.version
              FROM jsonb_each_text(p_channel_versions) AS v(channel, version)
             WHERE (v_parent ->> v.channel) IS DISTINCT FROM v.version
               AND NOT EXISTS (SELECT 1 FROM unnest(p_channels, p_versions) AS n(channel, version)
                                WHERE n.channel = v.channel AND n.version = v.version)
            OFFSET 0) AS r
     WHERE (SELECT true FROM tierstore_blobs AS b
             WHERE b.sid = v_sid AND b.channel = r.channel AND b.version = r.version) IS NULL;
    IF v_unheld IS NOT NULL THEN
        SELECT jsonb_agg(u.channel ORDER BY u.n) INTO v_missing
          FROM unnest(v_unheld) WITH ORDINALITY AS u(channel, n)
         WHERE NOT EXISTS (SELECT 1 FROM tierstore_checkpoints AS c
                            WHERE c.sid = v_sid AND c.checkpoint_id <> p_id
                              AND CASE WHEN c.archive_key IS NULL
                                       THEN c.channel_versions ->> u.channel END
                                  = p_channel_versions ->> u.channel);
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'checkpoint % names channel versions warm does not hold', p_id
                USING ERRCODE = 'TS404', DETAIL = v_missing::text;
        END IF;
    END IF;

    INSERT INTO tierstore_blobs (sid, channel, version, tag, data)
    SELECT v_sid, u.channel, u.version, u.tag, u.data
      FROM unnest(p_channels, p_versions, p_tags, p_data) AS u(channel, version, tag, data)
     WHERE u.tag <> 'empty'
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
