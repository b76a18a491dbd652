-- Fencing tokens of per-thread leases.
--
-- One row per thread that ever took a lease, keyed by the same digest as the
-- heads (tierstore_key of the thread id), so a deleted thread's fence outlives
-- it without keeping its id. fence is the newest token issued; a write carrying
-- a lower one is refused with SQLSTATE TS409.
CREATE TABLE tierstore_fences (
    thread_key bytea  NOT NULL PRIMARY KEY,
    fence      bigint NOT NULL
);

-- Issue the next token. The row lock this update takes waits for every fenced
-- write in flight (they hold the row FOR SHARE), so once a token is issued no
-- write with an older one can commit.
CREATE FUNCTION tierstore_next_fence(p_thread text) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO tierstore_fences AS f (thread_key, fence)
    VALUES (sha224(convert_to(p_thread, 'UTF8')), 1)
    ON CONFLICT (thread_key) DO UPDATE SET fence = f.fence + 1
    RETURNING f.fence
$$;

CREATE FUNCTION tierstore_check_fence(p_thread text, p_token bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_fence bigint;
BEGIN
    SELECT f.fence INTO v_fence FROM tierstore_fences AS f
     WHERE f.thread_key = sha224(convert_to(p_thread, 'UTF8'))
       FOR SHARE;
    IF v_fence > p_token THEN
        RAISE EXCEPTION 'lease token % was superseded by %', p_token, v_fence
            USING ERRCODE = 'TS409', DETAIL = v_fence::text;
    END IF;
END
$$;

-- The fenced variants: the check and the write are one statement, one transaction.
CREATE FUNCTION tierstore_put_checkpoint_fenced(
    p_token bigint,
    p_thread text, p_ns text, p_id text, p_parent text, p_strict boolean,
    p_run_id text, p_checkpoint_tag text, p_checkpoint bytea,
    p_metadata_tag text, p_metadata bytea, p_channel_versions jsonb, p_filter_doc jsonb,
    p_size integer, p_channels text[], p_versions text[], p_tags text[], p_data bytea[],
    OUT o_ok boolean, OUT o_head text, OUT o_version bigint, OUT o_n_writes integer,
    OUT o_conflict boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tierstore_check_fence(p_thread, p_token);
    SELECT p.o_ok, p.o_head, p.o_version, p.o_n_writes, p.o_conflict
      INTO o_ok, o_head, o_version, o_n_writes, o_conflict
      FROM tierstore_put_checkpoint(
          p_thread, p_ns, p_id, p_parent, p_strict, p_run_id, p_checkpoint_tag, p_checkpoint,
          p_metadata_tag, p_metadata, p_channel_versions, p_filter_doc, p_size,
          p_channels, p_versions, p_tags, p_data) AS p;
END
$$;

CREATE FUNCTION tierstore_put_writes_fenced(
    p_token bigint,
    p_thread text, p_ns text, p_id text,
    p_task_ids text[], p_idxs integer[], p_channels text[], p_tags text[], p_data bytea[],
    p_paths text[])
RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tierstore_check_fence(p_thread, p_token);
    RETURN tierstore_put_writes(p_thread, p_ns, p_id, p_task_ids, p_idxs, p_channels, p_tags,
                                p_data, p_paths);
END
$$;
