"""Stores on clients the application already holds: Redis and S3.

(PostgreSQL and MongoDB take theirs in their own packages: ``PostgresWarm.from_pool``,
``MongoWarm.from_client``.) ``tiers.CLIENTS`` routes a client here by its class; each
function checks it, takes the options its URL would carry, and builds a store that
uses the client and never closes it::

    redis.asyncio.Redis / RedisCluster ──► redis_hot(client, prefix=…, ttl=…)
                                             connection, TLS, retries: the client's
    aioboto3.Session ────────────────────► s3_store(session, bucket=…, …)
                                             the store opens its S3 client from the
                                             session and closes that client
    aioboto3 S3 client (entered) ────────► s3_store(client, bucket=…, …)
                                             endpoint, region, timeouts, retries: the
                                             client's; the deadline comes from them

Each function imports its backend when called, so a Redis client needs no S3 driver
installed, and the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from tierstore.errors import ConfigurationError

if TYPE_CHECKING:
    from tierstore.tiers.redis import RedisHot
    from tierstore.tiers.s3 import S3Store

__all__ = ["REDIS_OPTIONS", "S3_CLIENT_OPTIONS", "S3_SESSION_OPTIONS", "redis_hot", "s3_store"]

REDIS_OPTIONS: Final = ("prefix", "ttl", "timeout", "backoff", "backoff_max")
"""The ``redis://`` options that still apply to a client the caller made."""
S3_CLIENT_OPTIONS: Final = (
    "bucket", "prefix", "storage_class", "create_bucket", "restore_days", "restore_tier",
    "multipart_threshold", "part_size",
)
"""The ``s3://`` options of a store on the caller's S3 client (the rest are the client's)."""
S3_SESSION_OPTIONS: Final = (
    *S3_CLIENT_OPTIONS, "endpoint_url", "region", "connect_timeout", "read_timeout",
    "max_attempts", "addressing_style",
)
"""On the caller's session: those of the S3 client the store opens from it too."""
_S3_NUMBERS: Final = {
    "restore_days": int, "multipart_threshold": int, "part_size": int, "max_attempts": int,
    "connect_timeout": float, "read_timeout": float,
}


def _named(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _known(options: Mapping[str, Any], allowed: tuple[str, ...], what: str, hint: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) for {what}: {', '.join(unknown)}; known: "
            f"{', '.join(allowed)} ({hint})"
        )


# -- Redis --------------------------------------------------------------------------------


def redis_hot(client: object, *, ttl: float = 3600.0, **options: Any) -> RedisHot:
    """A hot store on the caller's ``redis.asyncio.Redis`` or ``RedisCluster``.

    ``options``: ``REDIS_OPTIONS`` (``ttl`` overrides the saver's ``hot_ttl``). The client
    must answer in bytes (``decode_responses=False``, redis-py's default).
    """
    from redis.asyncio import Redis, RedisCluster

    from tierstore.tiers.redis import RedisHot, RedisHotSettings

    if not isinstance(client, Redis | RedisCluster):
        raise ConfigurationError(
            f"the Redis hot tier takes a redis.asyncio.Redis or RedisCluster, got "
            f"{_named(client)}"
        )
    _known(options, REDIS_OPTIONS, "a Redis client", "connection settings belong to the client")
    cluster = isinstance(client, RedisCluster)
    if isinstance(client, RedisCluster):
        kwargs = dict(client.get_connection_kwargs())
        nodes = client.get_nodes() or list(client.nodes_manager.startup_nodes.values())
        if nodes:
            kwargs.setdefault("host", nodes[0].host)
            kwargs.setdefault("port", nodes[0].port)
    else:
        kwargs = dict(client.connection_pool.connection_kwargs)
    if kwargs.get("decode_responses"):
        raise ConfigurationError(
            "the Redis client decodes responses to str (decode_responses=True); the hot "
            "tier stores bytes: pass a client made with decode_responses=False"
        )
    db = 0 if cluster else int(kwargs.get("db") or 0)
    where = (f"{'redis+cluster' if cluster else 'redis'}://{kwargs.get('host', '?')}:"
             f"{kwargs.get('port', '?')}{'' if cluster else f'/{db}'} (caller's client)")
    values: dict[str, Any] = {"ttl": ttl, **options}
    try:
        for name in ("ttl", "timeout", "backoff", "backoff_max"):
            if name in values:
                values[name] = float(values[name])
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where!r}: bad option value ({exc})") from exc
    # where the entries live, as a URL-made store names it: savers on the same server and
    # prefix share a process's delete floors and head versions (hotcache.peers_of)
    host = str(kwargs.get("host") or kwargs.get("path") or "localhost")
    port = int(kwargs.get("port") or (0 if kwargs.get("path") else 6379))
    settings = RedisHotSettings(masked_url=where, cluster=cluster, db=db, host=host, port=port,
                                **values)
    return RedisHot(settings, client=client)


# -- S3 -----------------------------------------------------------------------------------

# class (module.qualname, most derived first in the MRO) -> what it is
_S3_CLASSES: Final = {
    "aioboto3.session.Session": "session",
    "aiobotocore.client.AioBaseClient": "client",
}


def _s3_kind(obj: object) -> str | None:
    """``"session"`` or ``"client"``; an aioboto3 session is also a boto3 one, so the most
    derived class decides, and a boto3 session or client (blocking) is not either."""
    for klass in type(obj).__mro__:
        found = _S3_CLASSES.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


def _client_deadline(client: Any) -> float:
    """``s3.request_deadline`` from the timeouts and retries of the caller's client."""
    from tierstore.tiers.s3 import request_deadline

    config = client.meta.config
    retries = dict(config.retries or {})
    if "total_max_attempts" in retries:
        attempts = int(retries["total_max_attempts"])
    elif "max_attempts" in retries:
        attempts = int(retries["max_attempts"]) + 1
    else:  # botocore's defaults: legacy mode makes 5 attempts, standard and adaptive 3
        attempts = 5 if retries.get("mode", "legacy") == "legacy" else 3
    return request_deadline(connect_timeout=float(config.connect_timeout or 60),
                            read_timeout=float(config.read_timeout or 60),
                            max_attempts=max(1, attempts))


def s3_store(client: object, **options: Any) -> S3Store:
    """An object store on the caller's ``aioboto3.Session`` or (entered) S3 client.

    ``options``: ``bucket`` (required) and the ``s3://`` options: ``S3_SESSION_OPTIONS``
    with a session, ``S3_CLIENT_OPTIONS`` with a client.
    """
    from tierstore.tiers.s3 import S3Store

    kind = _s3_kind(client)
    if kind is None:
        raise ConfigurationError(
            f"the S3 tier takes an aioboto3.Session or an S3 client opened from one, got "
            f"{_named(client)}"
        )
    if kind == "session":
        _known(options, S3_SESSION_OPTIONS, "an S3 session",
               "credentials and profile are the session's")
    else:
        _known(options, S3_CLIENT_OPTIONS, "an S3 client",
               "endpoint, region, credentials, timeouts and retries are the client's")
        service = client.meta.service_model.service_name  # type: ignore[attr-defined]
        if service != "s3":
            raise ConfigurationError(f"the S3 tier takes an S3 client, got a {service!r} client")
    kwargs = {k: v for k, v in options.items() if v is not None}
    bucket = str(kwargs.pop("bucket", "") or "")
    try:
        for name, kind_of in _S3_NUMBERS.items():
            if name in kwargs:
                kwargs[name] = kind_of(kwargs[name])
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"bad S3 option value ({exc})") from exc
    if "create_bucket" in kwargs and not isinstance(kwargs["create_bucket"], bool):
        raise ConfigurationError("create_bucket must be True or False")
    if kind == "session":
        return S3Store(bucket, session=client, **kwargs)
    return S3Store(bucket, client=client, deadline=_client_deadline(client), **kwargs)
