-- Fencing tokens of per-thread leases. thread_key is a SHA-256 digest of the
-- thread id (so a deleted thread's fence outlives it without keeping its id);
-- fence is the newest token issued. A write carrying a lower token is refused.
CREATE TABLE IF NOT EXISTS fences (
    thread_key TEXT    NOT NULL PRIMARY KEY,
    fence      INTEGER NOT NULL
) WITHOUT ROWID;
