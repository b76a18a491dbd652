-- The put functions on tables hash-partitioned by sid (partitions=N): tierstore_put_writes
-- counts its new rows without reading a system column, and both keep their plans.
--
-- The count of new rows (what the head's n_writes grows by) told an insert from an update
-- of a replacing write (idx < 0) by RETURNING xmax = 0. PostgreSQL refuses to return a
-- system column from an INSERT into a partitioned table ("cannot retrieve a system column
-- in this context"), so on a store whose tables are partitioned by sid every put_writes
-- failed. The replacing writes that already existed are now counted in the same statement,
-- from its snapshot, and taken off: new = kept + replaced - existed. The count is exact
-- because every writer of a namespace's writes holds its head row's update lock (taken
-- first here; put_checkpoint, copy, rehydrate, archive moves and deletes take it too), so
-- the snapshot this statement reads sees every write that committed before it.
--
-- Same signature and result as in 0006, so the fenced wrapper of 0004 calls this body;
-- what is stored, counted and returned is unchanged on either layout.
--
-- Plans: a statement of these functions names one namespace by a variable (v_sid). Planned
-- for the variable's value, it reads one partition; planned once for any value, it prunes
-- the others as it starts. PostgreSQL's plan cache compares the two by estimated cost, and
-- the generic plan's estimate counts every partition, so every statement of every put was
-- planned anew: with 16 partitions a put took 0.6 ms of server time instead of 0.45, a
-- put_writes 0.5 instead of 0.35. The functions keep the generic plan, as
-- tierstore_ancestors does (0008); on plain tables the two cost alike, and the server time
-- of a put is the same either way.
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
    ), existed AS (
        SELECT count(*) AS n
          FROM rows AS r
          JOIN tierstore_writes AS w
            ON w.sid = v_sid AND w.checkpoint_id = p_id AND w.task_id = r.task_id
           AND w.idx = r.idx
         WHERE r.idx < 0
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
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM kept) + (SELECT count(*) FROM replaced)
           - (SELECT n FROM existed)
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

ALTER FUNCTION tierstore_put_writes(
    text, text, text, text[], integer[], text[], text[], bytea[], text[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tierstore_put_checkpoint(
    text, text, text, text, boolean, text, text, bytea, text, bytea, jsonb, jsonb, integer,
    text[], text[], text[], bytea[])
    SET plan_cache_mode = force_generic_plan;
