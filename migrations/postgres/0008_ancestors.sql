-- A checkpoint's parent chain, cut down to some channels: what a DeltaChannel rebuild
-- reads (WarmRequests.ancestors). Replaces a recursive statement that re-hashed every
-- blob of the namespace at each link (its cost grew with the square of the chain).
--
-- One row per (link, asked channel) walks the chain, a primary-key probe per step:
--
--     chain: the start's parent, then each link's parent, while the channel is open
--       seed   the version this link stores a value at (a blob probe; a stub has none
--              here, its values are in cold), or '' where the link names the channel's
--              delta chain (~0~channel, ~1~channel, ...: a list the saver stored in
--              links), which ends that channel's walk
--       stops  at the root, at a parent that is not stored, or after p_limit links
--     rows:  each link (once per channel), each seed value (a chain's: every link, by
--            its stored name), each write to the channel
--
-- The walk follows parent_id, not the order of the ids: ids are time-ordered only
-- within one writer (a child can sort below its parent), and a range of ids holds
-- other branches' checkpoints too. Its channels are rows, not arrays: with one asked
-- channel (a graph's messages) a link costs its probes and nothing more.
--
-- Why a function: the plan. Every lookup is a lateral subquery that cannot be pulled
-- up (OFFSET 0) or a scalar subquery, so each is probed per link; but a plan made
-- while the tables are small prefers reading a table whole to probing it, and a
-- prepared plan keeps that choice as the tables grow (one namespace's walk would then
-- read every namespace's rows at each link). Sequential scans are off while this
-- function plans, so every lookup is an index probe whatever the tables' sizes; the
-- generic plan is kept (the channel array would otherwise force a new plan per call).
CREATE FUNCTION tierstore_ancestors(
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
     CROSS JOIN LATERAL (
           SELECT b.tag, b.data FROM tierstore_blobs AS b
            WHERE b.sid = chain.sid AND b.channel = v.name AND b.version = v.version
           OFFSET 0) AS b
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
