"""The one open/close state machine shared by every store and by the saver.

::

    unopened ──begin()──► opening ──opened()──► opened ──close()──► closed
        ▲                    │                                      ▲
        └─────failed()───────┘          (close() from any state) ───┘

A closed store is never reopened: its pool, client or thread is gone, and a caller
still holding it must fail loudly (``LifecycleError``) rather than silently open a
second connection behind the back of whoever closed it. A failed open goes back to
``unopened`` so ``setup()`` can be retried once the server answers.

Pure bookkeeping: no locks, no I/O. A store whose ``setup`` awaits holds the
``opening`` state across the await, which is what refuses a second, concurrent open
(or a store serialises opens with its own lock and never sees that error).
"""

from __future__ import annotations

from typing import Literal

from tierstore.errors import LifecycleError

__all__ = ["Lifecycle", "State"]

State = Literal["unopened", "opening", "opened", "closed"]


class Lifecycle:
    """Where a store is in its life, and the errors for using it at the wrong time.

    ``what`` names the store in messages (``"sqlite warm tier /data/w.db"``);
    ``open_hint`` and ``closed_hint`` tell the caller what to do instead.
    """

    __slots__ = ("closed_hint", "open_hint", "state", "what")

    def __init__(
        self,
        what: str,
        *,
        open_hint: str = "call setup() first",
        closed_hint: str = "build a new one",
    ) -> None:
        self.what = what
        self.open_hint = open_hint
        self.closed_hint = closed_hint
        self.state: State = "unopened"

    def __repr__(self) -> str:
        return f"Lifecycle({self.what!r}, {self.state})"

    @property
    def is_open(self) -> bool:
        return self.state == "opened"

    @property
    def is_closed(self) -> bool:
        return self.state == "closed"

    def begin(self) -> bool:
        """Start opening; False when already open (``setup`` is idempotent: nothing to do).

        Refuses a closed store and an open already under way.
        """
        if self.state == "opened":
            return False
        if self.state == "closed":
            raise LifecycleError(f"{self.what} is closed and cannot be reopened; "
                                 f"{self.closed_hint}")
        if self.state == "opening":
            raise LifecycleError(f"{self.what} is already being opened")
        self.state = "opening"
        return True

    def opened(self) -> None:
        """The open that ``begin`` started succeeded. A ``close`` that raced it wins."""
        if self.state == "opening":
            self.state = "opened"

    def failed(self) -> None:
        """The open that ``begin`` started failed: back to unopened, so it can be retried."""
        if self.state == "opening":
            self.state = "unopened"

    def require(self, action: str | None = None) -> None:
        """Raise ``LifecycleError`` unless open; ``action`` names what was attempted."""
        if self.state == "opened":
            return
        during = f" ({action})" if action else ""
        if self.state == "closed":
            raise LifecycleError(f"{self.what} is closed{during}; {self.closed_hint}")
        raise LifecycleError(f"{self.what} is not open{during}; {self.open_hint}")

    def close(self) -> bool:
        """Mark closed; True the first time only, so ``aclose`` releases things once."""
        if self.state == "closed":
            return False
        self.state = "closed"
        return True
