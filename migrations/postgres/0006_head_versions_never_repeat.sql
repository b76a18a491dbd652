-- Head versions never repeat; a pending write is never missed by its checkpoint's put.
--
-- A deleted namespace loses its head row. Recreated (copy back, import, a new
-- first put), its version restarted at 1, so a copy cached before the delete
-- could match the new head's version and be served. A new head row now starts
-- at the database clock in microseconds since the epoch, and every change adds
-- one: a later incarnation starts above every version an earlier one reached
-- (that would take more than one change per microsecond).
--
-- tierstore_put_writes took only KEY SHARE on the head row, which does not
-- conflict with the update lock of tierstore_put_checkpoint: a put making the
-- checkpoint the head, running while a write for it was still uncommitted,
-- counted the writes without it (READ COMMITTED) and the head's version and
-- write count missed it, so a cached copy without the write passed as fresh.
-- put_writes now takes the same update lock first: the put waits for the write
-- to commit and counts it, or the write waits for the put and advances the
-- version of the head it now is. Writes to one namespace serialise on its row.
ALTER TABLE tierstore_heads
    ALTER COLUMN version SET DEFAULT
        (floor(extract(epoch FROM clock_timestamp()) * 1000000))::bigint;

CREATE OR REPLACE FUNCTION tierstore_put_writes(
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
        -- The head row's update lock, the one put_checkpoint takes: a put that
        -- makes p_id the head waits for this write to commit and counts it.
        SELECT h.sid INTO v_sid
          FROM tierstore_heads AS h
         WHERE tierstore_key(h.thread_id) = sha224(convert_to(p_thread, 'UTF8'))
           AND tierstore_key(h.checkpoint_ns) = sha224(convert_to(p_ns, 'UTF8'))
           AND h.thread_id = p_thread AND h.checkpoint_ns = p_ns
           FOR NO KEY UPDATE;
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
