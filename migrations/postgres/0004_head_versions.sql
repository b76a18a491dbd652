-- The head version advances with every change to a head, pending writes included.
--
-- Writes with a negative index (interrupt, resume, error) replace each other, so
-- the head's write count can stay the same while what the latest checkpoint
-- reads as changes; a cached copy is served only while its version equals the
-- head's, so every put_writes against the head checkpoint now advances the
-- version in the same statement, and returns it (NULL when p_id is not the
-- head). The return type changes, so the functions are dropped and created
-- again (CREATE OR REPLACE cannot change it); the migration is one transaction.
DROP FUNCTION tierstore_put_writes_fenced(
    bigint, text, text, text, text[], integer[], text[], text[], bytea[], text[]);
DROP FUNCTION tierstore_put_writes(
    text, text, text, text[], integer[], text[], text[], bytea[], text[]);

CREATE FUNCTION tierstore_put_writes(
    p_thread text, p_ns text, p_id text,
    p_task_ids text[], p_idxs integer[], p_channels text[], p_tags text[], p_data bytea[],
    p_paths text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_sid bigint;
    v_new integer;
    v_version bigint;
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

    -- Every call moves the version, even one that only replaced a write: the
    -- content changed while the count did not.
    UPDATE tierstore_heads AS h
       SET n_writes = h.n_writes + v_new, version = h.version + 1
     WHERE h.sid = v_sid AND h.head_id = p_id
    RETURNING h.version INTO v_version;
    RETURN v_version;
END
$$;

CREATE FUNCTION tierstore_put_writes_fenced(
    p_token bigint,
    p_thread text, p_ns text, p_id text,
    p_task_ids text[], p_idxs integer[], p_channels text[], p_tags text[], p_data bytea[],
    p_paths text[])
RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tierstore_check_fence(p_thread, p_token);
    RETURN tierstore_put_writes(p_thread, p_ns, p_id, p_task_ids, p_idxs, p_channels, p_tags,
                                p_data, p_paths);
END
$$;
