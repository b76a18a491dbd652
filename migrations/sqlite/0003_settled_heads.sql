-- History demotion marks a head it found nothing (more) to move in as settled:
-- settled_head is the head id it looked at, settled_until the creation time of
-- the next checkpoint that will become old enough to move (NULL: none). A claim
-- skips the head while head_id = settled_head and its age cutoff is at or below
-- settled_until, so runs end; a new checkpoint changes head_id and ends the marker.
ALTER TABLE heads ADD COLUMN settled_head TEXT;
ALTER TABLE heads ADD COLUMN settled_until REAL;
