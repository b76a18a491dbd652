"""The checkpointer of a LangGraph Agent Server (``langgraph dev`` / ``langgraph up``).

``langgraph.json`` names it::

    "checkpointer": {"path": "tierstore.agent_server.checkpointer"}

and the stores come from the environment, as for ``TieredSaver.from_env`` and the
command line: ``TIERSTORE_HOT_URL`` / ``_WARM_URL`` / ``_COLD_URL``, or a region table
in ``TIERSTORE_REGIONS_FILE``, and the ``TIERSTORE_*`` options.

How the server uses it::

    server ──► checkpointer() ──► async with TieredSaver ──► yields the open saver
     (once per event loop: the API's loop, and with BG_JOB_ISOLATED_LOOPS=true
      the loop of each background worker thread, entered lazily on first use)

A saver is bound to the loop it was opened on (its connection pools are), so every
call of ``checkpointer`` builds and opens a saver of its own; they share the stores,
and ``hot_check="verify"`` (the default) keeps each one's hot copy honest against the
warm head whichever loop wrote last.

The serde is the server's: its ``Serializer`` (pickle fallback and
``allowed_json_modules`` as ``langgraph.json``'s ``checkpointer.serde`` sets them,
strict msgpack under ``LANGGRAPH_STRICT_MSGPACK``), so a value stores and reads back
as it would with the server's own checkpointer. Outside a server, LangGraph's
default serde is used.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from langgraph.checkpoint.serde.base import SerializerProtocol

from tierstore.saver import TieredSaver

__all__ = ["checkpointer", "server_serde"]


def server_serde() -> SerializerProtocol | None:
    """The Agent Server's checkpoint serializer inside a running server, else None.

    The server has loaded its configuration before it loads a checkpointer; outside a
    server, importing that configuration would read the environment of a deployment
    (``REDIS_URI``, …) that is not there, so it is not imported.
    """
    if "langgraph_api.config" not in sys.modules:
        return None
    from langgraph_api.serde import Serializer

    serde: SerializerProtocol = Serializer()
    return serde


@asynccontextmanager
async def checkpointer() -> AsyncIterator[TieredSaver]:
    """An open ``TieredSaver`` over the stores the environment names, closed on exit.

    Each call opens a saver of its own on the running loop. A bad configuration is
    refused with ``ConfigurationError`` before anything connects, so the server fails
    at startup, naming the variable or URL at fault.
    """
    async with TieredSaver.from_env(serde=server_serde()) as saver:
        yield saver
