-- History demotion marks a head it found nothing (more) to move in as settled:
-- settled_head is the head id it looked at, settled_until the creation time (epoch
-- seconds) of the next checkpoint that will become old enough to move (NULL: none).
-- A claim skips the head while head_id = settled_head and its age cutoff is at or
-- below settled_until, so runs end; a new checkpoint changes head_id and ends the
-- marker. Nullable columns without defaults: adding them rewrites nothing.
ALTER TABLE tierstore_heads
    ADD COLUMN settled_until double precision,
    ADD COLUMN settled_head  text COLLATE "C";
