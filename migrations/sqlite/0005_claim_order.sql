-- History demotion's claims take heads oldest first and skip the settled ones (0003).
-- Walking heads_updated_at, every claim of a run stepped over every head settled so
-- far: a claim cost grew with the store. Unsettled heads now have an index of their
-- own, in claim order, and settled heads one by the time they have work again, so a
-- claim reads about as many index entries as it takes heads.
CREATE INDEX IF NOT EXISTS heads_unsettled ON heads (updated_at)
    WHERE settled_head IS NULL OR settled_head <> head_id;
CREATE INDEX IF NOT EXISTS heads_settled_until ON heads (settled_until)
    WHERE settled_head = head_id;
