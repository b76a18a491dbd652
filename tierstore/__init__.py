"""tierstore: a tiered LangGraph checkpointer (hot cache, warm record, cold archive).

    from tierstore import TieredSaver
    async with TieredSaver.from_urls() as saver:          # embedded stack under ./.tierstore/
        app = builder.compile(checkpointer=saver)
"""

from tierstore.codec.crypto import Keyring
from tierstore.concurrency import retry_on_conflict, retry_on_conflict_sync
from tierstore.errors import (
    CheckpointArchived,
    ConfigurationError,
    CorruptPayload,
    DecompressionLimit,
    InvalidInput,
    LeaseBusy,
    LeaseLost,
    LifecycleError,
    PayloadTooLarge,
    PruneRefused,
    ResidencyError,
    StorageError,
    TierstoreError,
    TierUnavailable,
    TurnInProgress,
    UnsafePayload,
    UsageError,
    VersionConflict,
)
from tierstore.saver import TieredSaver
from tierstore.settings import SaverOptions

__all__ = [
    "CheckpointArchived",
    "ConfigurationError",
    "CorruptPayload",
    "DecompressionLimit",
    "InvalidInput",
    "Keyring",
    "LeaseBusy",
    "LeaseLost",
    "LifecycleError",
    "PayloadTooLarge",
    "PruneRefused",
    "ResidencyError",
    "SaverOptions",
    "StorageError",
    "TierUnavailable",
    "TieredSaver",
    "TierstoreError",
    "TurnInProgress",
    "UnsafePayload",
    "UsageError",
    "VersionConflict",
    "retry_on_conflict",
    "retry_on_conflict_sync",
]

__version__ = "0.1.0"
