-- tierstore_ancestors() (0008 describes the walk) with one change: a link of a delta
-- chain (~k~channel) that a walked checkpoint names but tierstore_blobs no longer holds
-- (storage damage, a bad manual delete) comes back as a seed-value row with a NULL tag
-- and NULL data instead of no row at all.
--
-- A chain is a value only whole. Without a row the caller saw only the links still
-- held, and a lost deepest link looked like a chain that ends one link early: a list
-- missing its last items, silently. With the row the store reports the channel missing
-- at that checkpoint and the history is refused, as a read of that checkpoint is.
--
-- Nothing else changes: the same walk, the same rows for a healthy chain, a
-- primary-key probe per lookup (each named link's blob lookup is still a lateral
-- subquery that cannot be pulled up, joined LEFT instead of CROSS), the same settings.
-- A plain seed's value never comes back NULL: its version was chosen because its row
-- exists, in the same snapshot.
CREATE OR REPLACE FUNCTION tierstore_ancestors(
    p_thread text, p_ns text, p_id text, p_limit integer, p_channels text[])
RETURNS TABLE (o_depth integer, o_checkpoint_id text, o_parent_id text, o_archive_key text,
               o_channel text, o_tag text, o_data bytea, o_task_id text, o_idx integer,
               o_task_path text)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH RECURSIVE chain AS (
        SELECT c.sid, a.channel, c.checkpoint_id, c.parent_id, c.archive_key, 1 AS depth,
               CASE WHEN c.archive_key IS NOT NULL THEN NULL
                    WHEN x.version IS NOT NULL THEN (
                        SELECT b.version FROM tierstore_blobs AS b
                         WHERE b.sid = c.sid AND b.channel = a.channel
                           AND b.version = x.version AND b.tag <> 'empty')
                    WHEN c.channel_versions ? ('~0~' || a.channel) THEN '' END AS seed
          FROM (SELECT t.sid, t.parent_id FROM tierstore_checkpoints AS t
                 WHERE t.sid = (SELECT s.sid FROM tierstore_heads AS s
                                 WHERE tierstore_key(s.thread_id) = sha224(convert_to(p_thread, 'UTF8'))
                                   AND tierstore_key(s.checkpoint_ns) = sha224(convert_to(p_ns, 'UTF8'))
                                   AND s.thread_id = p_thread AND s.checkpoint_ns = p_ns)
                   AND t.checkpoint_id = p_id) AS t
         CROSS JOIN LATERAL (
               SELECT c.sid, c.checkpoint_id, c.parent_id, c.archive_key, c.channel_versions
                 FROM tierstore_checkpoints AS c
                WHERE c.sid = t.sid AND c.checkpoint_id = t.parent_id OFFSET 0) AS c
         CROSS JOIN unnest(p_channels) AS a(channel)
         CROSS JOIN LATERAL (SELECT c.channel_versions ->> a.channel AS version) AS x
        UNION ALL
        SELECT p.sid, chain.channel, p.checkpoint_id, p.parent_id, p.archive_key,
               chain.depth + 1,
               CASE WHEN p.archive_key IS NOT NULL THEN NULL
                    WHEN x.version IS NOT NULL THEN (
                        SELECT b.version FROM tierstore_blobs AS b
                         WHERE b.sid = p.sid AND b.channel = chain.channel
                           AND b.version = x.version AND b.tag <> 'empty')
                    WHEN p.channel_versions ? ('~0~' || chain.channel) THEN '' END
          FROM chain
         CROSS JOIN LATERAL (
               SELECT p.sid, p.checkpoint_id, p.parent_id, p.archive_key, p.channel_versions
                 FROM tierstore_checkpoints AS p
                WHERE p.sid = chain.sid AND p.checkpoint_id = chain.parent_id OFFSET 0) AS p
         CROSS JOIN LATERAL (SELECT p.channel_versions ->> chain.channel AS version) AS x
         WHERE chain.depth < p_limit AND chain.seed IS NULL
    )
    SELECT chain.depth, chain.checkpoint_id, chain.parent_id, chain.archive_key,
           NULL::text, NULL::text, NULL::bytea, NULL::text, NULL::integer, NULL::text
      FROM chain
    UNION ALL
    SELECT chain.depth, chain.checkpoint_id, NULL, NULL, v.name, b.tag, b.data,
           NULL, NULL, NULL
      FROM chain
     CROSS JOIN LATERAL (
           SELECT chain.channel AS name, chain.seed AS version WHERE chain.seed <> ''
           UNION ALL
           SELECT l.name, l.version
             FROM tierstore_checkpoints AS c, jsonb_each_text(c.channel_versions) AS l(name, version)
            WHERE chain.seed = '' AND c.sid = chain.sid AND c.checkpoint_id = chain.checkpoint_id
              AND substring(l.name FROM '^~(?:0|[1-9][0-9]{0,3})~(.*)$') = chain.channel
           OFFSET 0) AS v
      LEFT JOIN LATERAL (
           SELECT b.tag, b.data FROM tierstore_blobs AS b
            WHERE b.sid = chain.sid AND b.channel = v.name AND b.version = v.version
           OFFSET 0) AS b ON true
     WHERE chain.seed IS NOT NULL
    UNION ALL
    SELECT chain.depth, chain.checkpoint_id, NULL, NULL, w.channel, w.tag, w.data,
           w.task_id, w.idx, w.task_path
      FROM chain
     CROSS JOIN LATERAL (
           SELECT w.channel, w.tag, w.data, w.task_id, w.idx, w.task_path
             FROM tierstore_writes AS w
            WHERE w.sid = chain.sid AND w.checkpoint_id = chain.checkpoint_id
              AND w.channel = chain.channel
           OFFSET 0) AS w;
END
$$;
