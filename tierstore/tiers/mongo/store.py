"""``MongoWarm``: the warm tier assembled from its concerns (see the package docstring).

It declares ``WarmStore`` (every narrow warm protocol: requests, fencing, admin,
tiering) so that mypy checks each layer's public signatures against it.
"""

from __future__ import annotations

from tierstore.tiers.base import WarmStore
from tierstore.tiers.mongo.reads import MongoReads
from tierstore.tiers.mongo.tiering import MongoTiering
from tierstore.tiers.mongo.writes import MongoWrites

__all__ = ["MongoWarm"]


class MongoWarm(MongoReads, MongoWrites, MongoTiering, WarmStore):
    """Warm tier on one MongoDB database, with large payloads in GridFS.

    Give it a URL (it creates, owns and closes its client), or a database object
    (``client[name]``; PyMongo async, Motor or mongomock-motor), or a client plus a
    database name; objects passed in stay the caller's to close.
    """

    backend = "mongodb"
    offloads_internally = True
    """Tells ``build_stack`` not to put an object-store offloader in front: GridFS is ours."""
