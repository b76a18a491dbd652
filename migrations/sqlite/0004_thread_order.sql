-- A thread's history in list order (newest first, across namespaces), so listing a
-- thread without naming its namespace reads each page as one index range instead of
-- re-scanning and re-sorting the whole thread for every page.
CREATE INDEX IF NOT EXISTS checkpoints_thread_order
    ON checkpoints (thread_id, checkpoint_id, checkpoint_ns);
