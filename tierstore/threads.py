"""Whole-thread operations: delete, expire, delete runs, copy, publish, prune.

Each changes warm first (the system of record), then drops the cached copies of
the threads (``HotCache``, with a tombstone taken before the warm change), then
cleans up the cold side (``Archive``): segments no stub names any more and
offloaded objects no row names any more. A crash between the steps leaves only
bytes nothing names, and a marker that lets ``ColdGC`` finish the job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tierstore.errors import InvalidInput, ResidencyError
from tierstore.offload import COPYING, DELETING, SWEEPING, copy_space
from tierstore.policy import tombstone_version
from tierstore.records import Claim
from tierstore.region import Region, Regions

__all__ = ["Threads"]


class Threads:
    """Whole-thread operations over the regions of one saver."""

    def __init__(self, regions: Regions) -> None:
        self.regions = regions

    async def delete_thread(self, thread_id: str) -> None:
        """Delete a thread from every tier: warm rows, hot entries, offloaded objects, segments.

        ::

            marker ─► warm delete ─► hot invalidate ─► segments no stub names
                   ─► the thread's offloaded objects ─► marker removed

        A crash after the warm delete leaves the marker, and ``ColdGC`` finishes the
        job after its grace period. A segment a copy still names is compacted to the
        checkpoints the copy names (the copy's own data), and goes with the copy.
        """
        region = self.regions.for_thread(thread_id)
        archive = region.archive
        floor = tombstone_version(time.time())
        await region.invalidate_hot([thread_id], floor=floor)
        archived = await archive.thread_segments(thread_id)
        marker = await archive.mark(DELETING, thread_id)
        await region.warm.delete_thread(thread_id)
        await region.invalidate_hot([thread_id], floor=floor)
        await archive.purge_thread(thread_id, archived)
        await archive.unmark(marker)

    async def expire_thread(self, thread_id: str, heads: Sequence[Claim], *, owner: str,
                            now: float, keep_latest: bool) -> bool:
        """Retention's delete (or prune to the newest checkpoints) of a claimed thread,
        done only if warm finds the thread unchanged since ``heads`` were claimed.

        The warm store decides in the same atomic step as its delete, so a turn
        committed after the claim keeps the whole thread; the cold side is touched
        only after warm said yes. Returns whether the thread was expired.
        """
        region = self.regions.for_thread(thread_id)
        archive = region.archive
        archived = await archive.thread_segments(thread_id)
        started = time.time()
        marker = await archive.mark(SWEEPING if keep_latest else DELETING, thread_id)
        floor = tombstone_version(time.time())
        if not await region.warm.expire_thread(thread_id, heads, owner=owner, now=now,
                                               keep_latest=keep_latest):
            await archive.unmark(marker)
            return False
        await region.invalidate_hot([thread_id], floor=floor)
        if keep_latest:
            for key in sorted(set(archived)):
                await archive.compact_segment(key)
            _, spared = await archive.drop_unnamed_objects([thread_id], started=started)
            if spared:  # the marker stays: ColdGC sweeps the rest once they are old enough
                return True
        else:
            await archive.purge_thread(thread_id, archived)
        await archive.unmark(marker)
        return True

    async def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints of some runs from every tier.

        A segment is shared by the checkpoints of one (thread, ns), whichever run
        wrote them, and by every copy of the thread. So the segments holding archived
        checkpoints of these runs are found first (one indexed lookup by run) and
        rewritten without them, the kept stubs moving to the new segment; only then
        are the runs deleted from warm, and the old segments, named by nothing any
        more, deleted::

            stubs of the runs ─► rewrite their segments, move the kept stubs
                ─► warm delete ─► hot invalidate ─► old segments ─► unnamed objects

        A call cut short before the warm delete is finished by calling it again (the
        runs' stubs still name the old segments); after it, what is left is named by
        nothing: old segments go with ``ColdGC``, and so do the offloaded objects of
        each touched thread (a marker names the thread until they are swept).
        """
        for region in self.regions.distinct():
            archive = region.archive
            started = time.time()
            doomed: dict[str, set[str]] = {}
            while region.cold is not None:
                # a worker may archive more of these runs while their segments are being
                # rewritten: look again until no new segment holds them
                found = await region.warm.archive_stubs(run_ids=run_ids)
                fresh = {k: v for k, v in found.items() if doomed.get(k) != v}
                if not fresh:
                    break
                for key in sorted(fresh):
                    await archive.rewrite_segment(key, fresh[key])
                doomed.update(fresh)
            floor = tombstone_version(time.time())
            touched = await region.warm.delete_for_runs(run_ids)
            markers = [await archive.mark(SWEEPING, t) for t in touched]
            await region.invalidate_hot(touched, floor=floor)
            await archive.drop_unreferenced_segments(sorted(doomed))
            await archive.sweep(touched, markers, started=started)

    def _same_region(self, source: str, target: str, what: str) -> Region:
        src, dst = self.regions.for_thread(source), self.regions.for_thread(target)
        if src is not dst:
            raise ResidencyError(
                f"cannot {what} thread {source!r} {'into' if what == 'copy' else 'as'} "
                f"{target!r}: they live in different regions"
            )
        return dst

    async def copy_thread(self, source: str, target: str) -> None:
        dst = self._same_region(source, target, "copy")
        archive = dst.archive
        # the copy's references resolve in its own space: objects first, rows second
        marker = await archive.mark(COPYING, target)
        if dst.offloader is not None and source != target:
            await copy_space(dst.offloader.store, source, target)
        floor = tombstone_version(time.time())
        await dst.warm.copy_thread(source, target)
        await archive.unmark(marker)
        await dst.invalidate_hot([target], floor=floor)

    async def publish_thread(self, source: str, target: str, *, replace: bool) -> None:
        """``copy_thread`` for an import: refuses a target with checkpoints unless
        ``replace``, and then swaps the target's rows for the copy in one warm step.

        The old target's segments and offloaded objects that nothing names any more
        are deleted after that step (an interrupted clean-up leaves only unnamed
        bytes, which a later delete or ``ColdGC`` removes).
        """
        dst = self._same_region(source, target, "publish")
        archive = dst.archive
        archived = await archive.thread_segments(target) if replace else []
        started = time.time()
        marker = await archive.mark(COPYING, target)
        floor = tombstone_version(time.time())
        if dst.offloader is not None and source != target:
            await copy_space(dst.offloader.store, source, target)
        try:
            await dst.warm.publish_thread(source, target, replace=replace)
        except InvalidInput:
            # refused: nothing was published. Objects copied into the target's space
            # stay until that thread is deleted (an object a put in flight is about
            # to name cannot be told apart from them).
            await archive.unmark(marker)
            raise
        finally:
            await dst.invalidate_hot([target], floor=floor)
        if replace:
            await archive.drop_unreferenced_segments(archived)
            _, spared = await archive.drop_unnamed_objects([target], started=started)
            if spared:  # the marker stays: ColdGC sweeps the rest once they are old enough
                return
        await archive.unmark(marker)

    async def prune(self, thread_ids: Sequence[str], *, keep_latest: bool) -> None:
        by_region: dict[Region, list[str]] = {}
        for thread_id in thread_ids:
            by_region.setdefault(self.regions.for_thread(thread_id), []).append(thread_id)
        for region, threads in by_region.items():
            if not keep_latest:  # the "delete" strategy deletes whole threads
                for thread_id in threads:
                    await self.delete_thread(thread_id)
                continue
            archive = region.archive
            before: list[str] = []
            for thread_id in threads:
                before.extend(await archive.thread_segments(thread_id))
            started = time.time()
            markers = [await archive.mark(SWEEPING, t) for t in threads]
            floor = tombstone_version(time.time())
            await region.warm.prune(threads, keep_latest=keep_latest)
            await region.invalidate_hot(threads, floor=floor)
            for key in sorted(set(before)):
                await archive.compact_segment(key)
            await archive.sweep(threads, markers, started=started)
