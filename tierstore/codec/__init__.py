"""Payload codecs: LangGraph serde → bytes → zstd (→ more stages), named by a tag."""

from tierstore.codec.frames import pack_stored, unpack_stored
from tierstore.codec.pipeline import Codec

__all__ = ["Codec", "pack_stored", "unpack_stored"]
