"""``mongodb://host/dbname`` and ``mongodb+srv://…/dbname`` — the MongoDB warm tier.

Production talks to the server through PyMongo's native async API
(``pymongo.AsyncMongoClient``); the code keeps to the operations that Motor and
mongomock-motor also provide (no transactions, no ``bulk_write``, aggregation only
where noted), so the same package runs against the in-process mock the tests use.

One module per concern, each a layer of ``MongoWarm`` (lower layers first)::

    documents       collection names, limits, filter and payload helpers (no I/O)
    migrations      index specs from migrations/mongo/*.json, applied at setup
    connection      client, lifecycle, URL options, driver errors -> tierstore errors
    gridfs_offload  payloads too large for their document, and their files
    steps           head, fence, blob and write steps the concerns below share
    reads           head, get, list
    writes          put_checkpoint, put_writes, next_fence (the write flow)
    admin           delete, prune, copy, publish threads; usage
    tiering         leases, archive stubs, rehydration
    store           MongoWarm = reads + writes + tiering (+ admin)
"""

from __future__ import annotations

from tierstore.tiers.mongo.connection import BucketFactory, GridFSBucket
from tierstore.tiers.mongo.documents import (
    COLLECTIONS,
    DOCUMENT_BUDGET,
    GRIDFS_BUCKET,
    MAX_DOCUMENT,
    filter_entry,
    fit_document,
)
from tierstore.tiers.mongo.store import MongoWarm

__all__ = [
    "COLLECTIONS",
    "DOCUMENT_BUDGET",
    "GRIDFS_BUCKET",
    "MAX_DOCUMENT",
    "BucketFactory",
    "GridFSBucket",
    "MongoWarm",
    "filter_entry",
    "fit_document",
]
