"""What ``TieredSaver.aput`` stores, encoded: the checkpoint record, the new channel
blobs, every payload the hot copy carries, and the delta chains of list channels.

Pure but for the caches it fills (payloads by version, chains by channel), so that
``offthread`` may run it again in a worker thread when it meets a large payload.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import Any, TypeVar

from langgraph.checkpoint.base import ChannelVersions, CheckpointMetadata

from tierstore.codec import Codec
from tierstore.codec.pipeline import EMPTY
from tierstore.delta import Chain, ChainWriter
from tierstore.errors import InvalidInput, TierstoreError
from tierstore.payloads import PayloadCache
from tierstore.records import BlobRecord, CheckpointRecord, Payload

__all__ = ["PutEncoding", "encode_refusing", "refusing_unencodable"]

T = TypeVar("T")


class PutEncoding:
    """Encodes puts with a saver's payload and chain caches (``delta``: list channels
    are stored as delta chains, ``tierstore.delta``)."""

    def __init__(self, payloads: PayloadCache, chains: ChainWriter, *, delta: bool) -> None:
        self._payloads = payloads
        self._chains = chains
        self.delta = delta

    def encode(
        self, codec: Codec, thread_id: str, ns: str, *, parent_id: str | None,
        checkpoint_id: str, body: dict[str, Any], md: CheckpointMetadata,
        values: Mapping[str, Any], versions: Mapping[str, str], fresh: Mapping[str, str],
        new_versions: ChannelVersions, filter_doc: dict[str, Any],
    ) -> tuple[CheckpointRecord, list[BlobRecord], dict[str, Payload], dict[str, Chain]]:
        """Everything ``aput`` stores, encoded: run again in a thread when large
        (``offthread``), so it changes nothing but caches it may fill twice."""
        chains = self._chained(codec, thread_id, ns, values, versions=versions, fresh=fresh)
        encoded = self._encode_values(codec, thread_id, ns,
                                      {ch: v for ch, v in values.items() if ch not in chains},
                                      versions=versions, new_versions=new_versions)
        new_blobs = [
            BlobRecord(ch, version, encoded.get(ch, EMPTY)) for ch, version in fresh.items()
            if ch not in chains
        ]
        stored_versions = dict(versions)
        for ch, chain in chains.items():
            # the checkpoint names every link of the chain instead of the channel
            del stored_versions[ch]
            stored_versions.update(chain.names)
            encoded.update(chain.payloads)
            if ch in fresh:
                name, version, payload = chain.links[-1]
                new_blobs.append(BlobRecord(name, version, payload))
        self._add_unchanged_values(thread_id, ns, encoded, versions,
                                   skip={*values, *fresh, *chains})
        record = CheckpointRecord.new(
            thread_id=thread_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            parent_id=parent_id,
            checkpoint=encode_refusing(codec, body, "checkpoint"),
            metadata=encode_refusing(codec, md, "checkpoint metadata"),
            channel_versions=stored_versions,
            filter_doc=filter_doc,
            run_id=md.get("run_id"),
        )
        return record, new_blobs, encoded, chains

    def _chained(
        self,
        codec: Codec,
        thread_id: str,
        ns: str,
        values: Mapping[str, Any],
        *,
        versions: Mapping[str, str],
        fresh: Mapping[str, str],
    ) -> dict[str, Chain]:
        """The list channels stored as delta chains (``tierstore.delta``), with their chains.

        A new version of a list is a chain (one more link, or a new snapshot). An
        unchanged channel is one when this saver knows its chain at that version,
        whether or not the checkpoint carries its value: a ``DeltaChannel`` carries
        none, and the first checkpoints of a graph where the list became one name it
        at the version the plain list was stored at, whose value a saver that stores a
        value per version hands back. Otherwise an unchanged channel is named as a
        whole value, which the put stores again if warm holds it only as links (as
        empty when the checkpoint carries no value: LangGraph then rebuilds a
        ``DeltaChannel`` from its history). No channel is named like a link:
        ``checked_versions`` refused the put.
        """
        if not self.delta:
            return {}
        chains: dict[str, Chain] = {}
        for ch, version in versions.items():
            key = (thread_id, ns, ch)
            if ch not in fresh:
                known = self._chains.current(key, version)
                if known is not None:
                    chains[ch] = known
                continue
            value = values.get(ch)
            if type(value) is list and fresh[ch] == version:
                chains[ch] = refusing_unencodable(
                    partial(self._chains.next, codec, key, value, version),
                    f"value of channel {ch!r}")
        return chains

    def _encode_values(
        self,
        codec: Codec,
        thread_id: str,
        ns: str,
        values: Mapping[str, Any],
        *,
        versions: Mapping[str, str],
        new_versions: ChannelVersions,
    ) -> dict[str, Payload]:
        """Encoded channel values; an unchanged channel's is the payload stored for its
        version when the payload cache knows it (``tierstore.payloads``)."""
        encoded: dict[str, Payload] = {}
        for ch, value in values.items():
            version = versions.get(ch)
            if version is None:
                continue
            key = (thread_id, ns, ch, version)
            payload = None if ch in new_versions else self._payloads.get(key)
            if payload is None:
                payload = self._payloads.put(
                    key, encode_refusing(codec, value, f"value of channel {ch!r}"))
            encoded[ch] = payload
        return encoded

    def _add_unchanged_values(self, thread_id: str, ns: str, encoded: dict[str, Payload],
                              versions: Mapping[str, str], *, skip: Collection[str]) -> None:
        """The payloads of channels a checkpoint names, unchanged, without a value of its own.

        A ``DeltaChannel`` stores its value only at a snapshot; the checkpoints after it
        name the same version and carry no value, but a warm read hands that version's
        blob back with them. The hot copy carries it too when the payload cache knows it
        (this saver stored that version, or read a checkpoint naming it: LangGraph reads
        the head before a turn), or loading the thread from hot walks the ancestors for it.
        """
        for ch, version in versions.items():
            if ch not in skip:
                payload = self._payloads.get((thread_id, ns, ch, version))
                if payload is not None:
                    encoded[ch] = payload


def encode_refusing(codec: Codec, value: Any, where: str) -> Payload:
    """``codec.encode``, with a value the serde cannot encode refused as ``InvalidInput``.

    Serdes raise whatever their encoder raises (``TypeError`` for an unknown type,
    ``OverflowError`` or ``TypeError`` for an integer over 64 bits, ``ValueError`` for
    a lone surrogate); the caller learns which part of its input was at fault.
    """
    return refusing_unencodable(lambda: codec.encode(value), where)


def refusing_unencodable(encode: Callable[[], T], where: str) -> T:
    """Run an encoding; whatever the serde raises becomes ``InvalidInput`` naming ``where``."""
    try:
        return encode()
    except TierstoreError:
        raise
    except Exception as exc:
        raise InvalidInput(
            f"{where} cannot be encoded: {type(exc).__name__}: {exc}"[:500]) from exc
