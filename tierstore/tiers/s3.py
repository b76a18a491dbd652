"""``s3://bucket/prefix?storage_class=…`` — objects in S3 (or any S3 API), Glacier included.

::

    put(key, data, storage_class=None)          class: the argument, else the URL's
      ├─ len(data) <= multipart_threshold ──► PutObject with the SHA-256 of data
      │                                       (S3 refuses other bytes, keeps the digest)
      └─ larger ──► CreateMultipartUpload ──► UploadPart (n times) ──► CompleteMultipartUpload
                         └── any failure or cancellation ──► AbortMultipartUpload, then raise

    info(key) ──► HeadObject ──► size, class, restore state, age, and the SHA-256 S3
                                 kept for a one-request put (the archive's verification)

    get(key) ──► GetObject ──► bytes
      ├─ NoSuchKey ──► None
      └─ InvalidObjectState ──► HeadObject ──► CheckpointArchived(key, storage_class,
                                                                 restore_state)

    restore states of a GLACIER / DEEP_ARCHIVE object, read from HEAD's Restore header:

      not-started ──restore()──► in-progress ──(minutes to hours)──► ready ──(days)──┐
      (no header)         ongoing-request="true"     ongoing-request="false",        │
           ▲                                         expiry-date=…                   │
           └─────────────────────────────────────────────────────────────────────────┘

    STANDARD, STANDARD_IA, GLACIER_IR: "not-needed", read at once.

URL: ``s3://[access_key:secret@]bucket[/prefix]?option=value&…``. Credentials come
from the usual AWS chain (environment, ``profile``, instance role) unless the URL
carries them; the secret never appears in ``repr`` or in error messages.

=====================  ==============  ==================================================
option                 default         meaning
=====================  ==============  ==================================================
storage_class          STANDARD_IA     STANDARD, STANDARD_IA, GLACIER_IR, GLACIER,
                                       DEEP_ARCHIVE; a ``put`` may name another one
endpoint_url           AWS             e.g. ``http://127.0.0.1:9000`` for MinIO or moto
region                 AWS chain       bucket region (also used to create the bucket)
profile                AWS chain       named profile from ``~/.aws/config``
create_bucket          true            setup creates the bucket when it is missing
restore_days           7               days a restored copy stays readable
restore_tier           Standard        Standard, Bulk or Expedited
multipart_threshold    8MiB            larger objects go up in parts
part_size              8MiB            at least 5MiB (S3's minimum part size)
connect_timeout        2               seconds; an unreachable endpoint fails fast
read_timeout           20              seconds without a byte from the server
max_attempts           3               attempts per request, retries included
addressing_style       path|auto       ``path`` when endpoint_url is set, else ``auto``
=====================  ==============  ==================================================

Deadline: no request waits past ``request_deadline`` seconds, retries included:
``max_attempts x (connect_timeout + read_timeout)`` plus botocore's backoff between
attempts (at most ``min(20, 2**(n-1))`` seconds before retry ``n``) plus one second
(70 s with the defaults). ``read_timeout`` alone bounds only the wait for each byte
of an answer: PutObject and UploadPart go out with ``Expect: 100-continue`` and the
HTTP client waits for the ``100 Continue`` (and writes the body) with no timeout, so a
stalled link would otherwise hold a put forever. The deadline also bounds the
transfer itself: one request must move its bytes within it (an 8 MiB part in 70 s
needs about 120 KB/s). A request that runs out of time raises
``TierUnavailable("… timed out …")``; a multipart upload cut off that way is aborted
like any other failed one (the abort is itself a request with the same deadline).
The deadline is per request: a multipart put makes several.

A session or client of your own: ``tierstore.tiers.clients.s3_store`` (a client the
store opens from your session is closed with it; your own S3 client never is).

Every driver error goes through ``_translate`` (the one place that knows botocore's
error codes) and leaves as a tierstore error chained to the original.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import re
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConfigParseError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
)

from tierstore.errors import (
    CheckpointArchived,
    ConfigurationError,
    CorruptPayload,
    InvalidInput,
    PayloadTooLarge,
    TierstoreError,
    TierUnavailable,
)
from tierstore.lifecycle import Lifecycle, State
from tierstore.records import ObjectInfo
from tierstore.settings import StoreUrl
from tierstore.tiers.base import ObjectStore

__all__ = ["STORAGE_CLASSES", "S3Store", "request_deadline", "restore_state"]

log = logging.getLogger(__name__)

STORAGE_CLASSES: Final = ("STANDARD", "STANDARD_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")
# Classes whose objects cannot be read before a RestoreObject has finished.
_ARCHIVE_CLASSES: Final = frozenset({"GLACIER", "DEEP_ARCHIVE"})
RESTORE_TIERS: Final = ("Standard", "Bulk", "Expedited")

MiB: Final = 1 << 20
_MIN_PART: Final = 5 * MiB  # S3 refuses smaller parts (except the last one)
_MAX_PART: Final = 5 * 1024 * MiB
_MAX_PARTS: Final = 10_000
_MAX_KEY_BYTES: Final = 1024
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call
_LIST_PAGE = 1000  # and ListObjectsV2 returns at most 1000 per page
_PART_CONCURRENCY: Final = 4
_MAX_BACKOFF: Final = 20.0  # botocore's standard retry mode caps one backoff at 20 s
_DEADLINE_MARGIN: Final = 1.0  # seconds for botocore's own work around the network waits

# Characters that XML 1.0 cannot carry: keys holding them cannot travel in a
# DeleteObjects body, so they are deleted one request at a time.
_XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

_OPTIONS: Final = frozenset({
    "storage_class", "endpoint_url", "region", "profile", "create_bucket", "restore_days",
    "restore_tier", "multipart_threshold", "part_size", "connect_timeout", "read_timeout",
    "max_attempts", "addressing_style",
})


def restore_state(
    storage_class: str, restore_header: str | None, archive_status: str | None = None
) -> str:
    """Where an object stands on the way to being readable, from its HEAD response.

    ``restore_header`` is S3's ``x-amz-restore`` (``ongoing-request="true"`` while the
    copy is being made, ``ongoing-request="false", expiry-date=…`` once it is
    readable); ``archive_status`` is set for Intelligent-Tiering objects that sit in
    an archive tier, which need a restore just like GLACIER.
    """
    if storage_class not in _ARCHIVE_CLASSES and not archive_status:
        return "not-needed"
    if not restore_header:
        return "not-started"
    match = re.search(r'ongoing-request\s*=\s*"?(true|false)"?', restore_header, re.IGNORECASE)
    if match is None:
        return "not-started"
    return "in-progress" if match.group(1).lower() == "true" else "ready"


def request_deadline(*, connect_timeout: float, read_timeout: float, max_attempts: int) -> float:
    """Seconds one S3 request may take, every attempt and backoff included.

    Each attempt may wait ``connect_timeout`` to connect and ``read_timeout`` for the
    answer; botocore's standard retry mode sleeps at most ``min(20, 2**(n-1))``
    seconds before retry ``n``.
    """
    attempts = max(1, max_attempts)
    backoff = sum(min(_MAX_BACKOFF, 2.0 ** (n - 1)) for n in range(1, attempts))
    return attempts * (connect_timeout + read_timeout) + backoff + _DEADLINE_MARGIN


def _whole_object_sha256(answer: Mapping[str, Any]) -> str | None:
    """The hex SHA-256 of a whole object from a HEAD answer, if S3 keeps one.

    A multipart upload's checksum is a checksum of its parts' checksums
    (``ChecksumType`` COMPOSITE, the value ending in ``-<parts>``): not the digest of
    the bytes, so it is not reported.
    """
    value = answer.get("ChecksumSHA256")
    if not isinstance(value, str) or "-" in value or answer.get("ChecksumType") == "COMPOSITE":
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _normalise_prefix(path: str) -> str:
    """``/a//b/`` → ``a/b/``; empty stays empty. ``.`` and ``..`` are refused."""
    segments = [s for s in unquote(path).split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ConfigurationError(f"s3:// key prefix {path!r} may not contain '.' or '..'")
    return "/".join(segments) + "/" if segments else ""


def _parse_size(name: str, text: str) -> int:
    """``8388608``, ``8MiB``, ``512KiB``, ``1GiB`` → bytes."""
    units = {"": 1, "b": 1, "kib": 1 << 10, "kb": 1 << 10, "k": 1 << 10, "mib": MiB, "mb": MiB,
             "m": MiB, "gib": 1 << 30, "gb": 1 << 30, "g": 1 << 30}
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in units:
        raise ConfigurationError(f"s3:// option {name}={text!r} is not a size (e.g. 8MiB)")
    return int(match.group(1)) * units[match.group(2).lower()]


def _parse_number(name: str, text: str, *, minimum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= minimum or math.isinf(value):
        raise ConfigurationError(
            f"s3:// option {name}={text!r} must be a number of at least {minimum:g}"
        )
    return value


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"s3:// option {name}={text!r} must be true or false")


def _storage_class(value: str, *, source: str) -> str:
    normalised = value.strip().upper()
    if normalised not in STORAGE_CLASSES:
        raise ConfigurationError(
            f"unknown S3 storage class {value!r} ({source}); use one of "
            + ", ".join(STORAGE_CLASSES)
        )
    return normalised


def _validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"s3:// option endpoint_url={endpoint!r} must be an http:// or https:// URL"
        )
    if parts.password is not None:
        raise ConfigurationError(
            "s3:// option endpoint_url must not carry credentials; put them before the bucket "
            "(s3://key:secret@bucket/…) or in the AWS environment"
        )
    return endpoint.rstrip("/")


class _Missing(Exception):
    """The key (or, for HeadBucket, the bucket) does not exist; never leaves this module."""


@dataclass(frozen=True, slots=True)
class _Head:
    size: int
    storage_class: str
    restore_state: str
    modified: float = 0.0  # Last-Modified (whole seconds); garbage collection needs an age
    sha256: str | None = None  # hex; only a whole-object digest S3 checked on receipt


# -- the one place where driver errors become tierstore errors ----------------------------

_NOT_FOUND: Final = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion"})
_MISSING_OK_OPS: Final = frozenset({"GetObject", "HeadObject", "HeadBucket"})
_BAD_CREDENTIALS: Final = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "InvalidSecurity",
    "MissingSecurityHeader",
})
_DENIED: Final = frozenset({
    "AccessDenied", "403", "AllAccessDisabled", "AccountProblem", "ExpiredToken",
    "TokenRefreshRequired", "InvalidPayer", "RequestTimeTooSkewed",
})
_BAD_BUCKET: Final = frozenset({
    "InvalidBucketName", "PermanentRedirect", "301", "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException", "InvalidLocationConstraint", "BucketAlreadyExists",
})
_BAD_REQUEST: Final = frozenset({
    "KeyTooLongError", "InvalidArgument", "InvalidRequest", "InvalidStorageClass",
    "InvalidObjectName", "EntityTooSmall", "InvalidPart", "InvalidPartOrder",
})
_CORRUPT_UPLOAD: Final = frozenset({
    "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum",
})
# (operation, code) pairs that mean the caller's goal is already met.
_BENIGN: Final = frozenset({
    ("CreateBucket", "BucketAlreadyOwnedByYou"),
    ("AbortMultipartUpload", "NoSuchUpload"),
})
_CONFIG_DRIVER_ERRORS: Final = (
    NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, ProfileNotFound,
    NoRegionError, ConfigParseError,
)
DRIVER_ERRORS: Final = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)


def _translate(exc: BaseException, *, op: str, where: str) -> Exception | None:
    """The tierstore error for a driver error raised by ``op`` on ``where``.

    Returns None when the error means the operation's goal is already met (the bucket
    exists and is ours, the upload being aborted is already gone).
    """
    def unavailable(why: str) -> TierUnavailable:
        return TierUnavailable(f"S3 {op} on {where}: {why}", tier="cold", backend="s3")

    if isinstance(exc, ClientError):
        error: Mapping[str, Any] = exc.response.get("Error", {}) or {}
        code = str(error.get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        message = str(error.get("Message") or "")
        detail = code if not message or message == code else f"{code}: {message}"
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if (op, code) in _BENIGN:
            return None
        if code in _NOT_FOUND and op in _MISSING_OK_OPS:
            return _Missing(where)
        if code == "NoSuchBucket":
            return ConfigurationError(
                f"S3 bucket of {where} does not exist; create it or set create_bucket=true"
            )
        if code == "InvalidObjectState" and op == "GetObject":
            storage_class = str(error.get("StorageClass") or "GLACIER")
            return CheckpointArchived(
                f"{where} is in {storage_class} and must be restored before it can be read",
                key=where, storage_class=storage_class, restore_state="not-started",
            )
        if code == "RestoreAlreadyInProgress":
            return CheckpointArchived(
                f"a restore of {where} is already in progress",
                key=where, storage_class="", restore_state="in-progress",
            )
        if code in _BAD_CREDENTIALS:
            return ConfigurationError(
                f"S3 rejected the credentials for {where} ({code}): check the access key and "
                "secret (URL, environment or profile)"
            )
        if code in _DENIED:
            return unavailable(
                f"access denied ({detail}); check the credentials and the bucket and "
                "key policies"
            )
        if code in _BAD_BUCKET:
            return ConfigurationError(
                f"S3 refused the bucket of {where} ({detail}); check the bucket name "
                "and the region option"
            )
        if code == "EntityTooLarge":
            return PayloadTooLarge(f"S3 {op} on {where}: object too large ({detail})")
        if code in _CORRUPT_UPLOAD:
            return CorruptPayload(f"S3 {op} on {where}: bytes damaged in transit ({code})",
                                  where="s3", detail=code)
        if code in _BAD_REQUEST:
            return InvalidInput(f"S3 {op} on {where} refused the request ({detail})")
        if code in _NOT_FOUND or code == "NoSuchUpload":
            return unavailable(
                f"not found ({detail}): the object or upload vanished during the "
                "operation, or endpoint_url does not point at an S3 API"
            )
        return unavailable(detail or f"HTTP {status}")
    if isinstance(exc, _CONFIG_DRIVER_ERRORS):
        return ConfigurationError(f"S3 credentials or region for {where} are not usable: {exc}")
    if isinstance(exc, FlexibleChecksumError | ChecksumError):
        return CorruptPayload(f"S3 {op} on {where}: checksum mismatch ({exc})", where="s3",
                              detail=type(exc).__name__)
    if isinstance(exc, ParamValidationError):
        return InvalidInput(f"S3 {op} on {where}: invalid request ({exc})")
    return unavailable(f"{type(exc).__name__}: {exc}")


class S3Store(ObjectStore):
    """An ``ObjectStore`` on one bucket and key prefix.

    One client is opened by ``setup`` and held until ``aclose``: a client owns an HTTP
    connection pool, so making one per call would pay a TLS handshake per object.
    """

    backend = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        storage_class: str = "STANDARD_IA",
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        create_bucket: bool = True,
        restore_days: int = 7,
        restore_tier: str = "Standard",
        multipart_threshold: int = 8 * MiB,
        part_size: int = 8 * MiB,
        connect_timeout: float = 2.0,
        read_timeout: float = 20.0,
        max_attempts: int = 3,
        addressing_style: str | None = None,
        session: Any = None,
        client: Any = None,
        deadline: float | None = None,
    ) -> None:
        if not bucket:
            raise ConfigurationError("an s3:// URL must name a bucket: s3://bucket/prefix")
        if (access_key is None) != (secret_key is None):
            raise ConfigurationError("S3 credentials in the URL need both key and secret")
        if restore_tier not in RESTORE_TIERS:
            raise ConfigurationError(
                f"unknown restore_tier {restore_tier!r}; use one of {', '.join(RESTORE_TIERS)}"
            )
        if restore_days < 1:
            raise ConfigurationError(f"restore_days must be at least 1, got {restore_days!r}")
        if not _MIN_PART <= part_size <= _MAX_PART:
            raise ConfigurationError(
                f"part_size must be within 5MiB..5GiB (S3's limits), got {part_size}"
            )
        if multipart_threshold < 1:
            raise ConfigurationError(
                f"multipart_threshold must be positive, got {multipart_threshold}"
            )
        style = addressing_style or ("path" if endpoint_url else "auto")
        if style not in ("auto", "path", "virtual"):
            raise ConfigurationError(
                f"addressing_style must be auto, path or virtual, got {addressing_style!r}"
            )
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix)
        self.storage_class = _storage_class(storage_class, source="storage_class option")
        self.endpoint_url = _validate_endpoint(endpoint_url) if endpoint_url else None
        self.region = region
        self.create_bucket = create_bucket
        self.restore_days = restore_days
        self.restore_tier = restore_tier
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._profile = profile
        self._access_key = access_key
        self._secret_key = secret_key
        self._config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": style},
            max_pool_connections=16,
        )
        self.deadline = deadline or request_deadline(
            connect_timeout=connect_timeout, read_timeout=read_timeout, max_attempts=max_attempts)
        self._session = session  # the caller's, to open the client from
        self._given = client  # the caller's S3 client: used, never closed
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._life = Lifecycle(f"s3 object store s3://{bucket}/{self.prefix}",
                               closed_hint="build a new store")
        self._open_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: StoreUrl) -> S3Store:
        unknown = set(url.query) - _OPTIONS
        if unknown:
            raise ConfigurationError(
                f"unknown s3:// option(s) {', '.join(sorted(unknown))} in {url.masked!r}; "
                f"known: {', '.join(sorted(_OPTIONS))}"
            )
        q = url.query
        kwargs: dict[str, Any] = {}
        for name in ("storage_class", "endpoint_url", "region", "profile", "restore_tier",
                     "addressing_style"):
            if q.get(name):
                kwargs[name] = q[name]
        if "create_bucket" in q:
            kwargs["create_bucket"] = _parse_bool("create_bucket", q["create_bucket"])
        if "restore_days" in q:
            kwargs["restore_days"] = int(_parse_number("restore_days", q["restore_days"],
                                                       minimum=1))
        if "max_attempts" in q:
            kwargs["max_attempts"] = int(_parse_number("max_attempts", q["max_attempts"],
                                                       minimum=1))
        for name in ("connect_timeout", "read_timeout"):
            if name in q:
                kwargs[name] = _parse_number(name, q[name], minimum=0.001)
        for name in ("multipart_threshold", "part_size"):
            if name in q:
                kwargs[name] = _parse_size(name, q[name])
        if url.port is not None:
            raise ConfigurationError(
                f"{url.masked!r}: an s3:// URL names a bucket, not a server; put the server in "
                "endpoint_url=http://host:port"
            )
        if url.username is not None or url.password is not None:
            kwargs["access_key"] = url.username
            kwargs["secret_key"] = url.password
        # StoreUrl.host is lower-cased by urlsplit; S3 bucket names are lower-case anyway,
        # and a bucket with upper-case letters is refused by S3 with a clear error.
        return cls(url.host or "", prefix=url.path, **kwargs)

    @property
    def owns_client(self) -> bool:
        """Whether the store opened its client (and so closes it)."""
        return self._given is None

    def __repr__(self) -> str:
        return (
            f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"storage_class={self.storage_class!r}, endpoint_url={self.endpoint_url!r}, "
            f"region={self.region!r}, state={self._life.state!r})"
        )

    def __del__(self) -> None:
        life = getattr(self, "_life", None)
        if life is not None and life.is_open:
            warnings.warn(f"{self!r} was not closed; call aclose()", ResourceWarning,
                          stacklevel=2)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._life.state

    async def setup(self) -> None:
        """Open the client and make sure the bucket exists. Idempotent."""
        async with self._open_lock:
            if not self._life.begin():
                return
            stack = contextlib.AsyncExitStack()
            try:
                if self._given is not None:
                    self._client = self._given
                else:
                    # reading botocore's files is local work, not a request: it is not held
                    # to the request deadline (a loaded host can take seconds over it)
                    async with self._driver("CreateClient", "", timed=False):
                        session = await asyncio.to_thread(self._new_session)
                    async with self._driver("CreateClient", ""):
                        self._client = await stack.enter_async_context(session.client(
                            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            config=self._config,
                        ))
                await self._ensure_bucket()
            except BaseException:
                self._client = None
                await stack.aclose()
                self._life.failed()
                raise
            self._stack = stack
            self._life.opened()

    def _new_session(self) -> aioboto3.Session:
        """A session whose files are read: run in a worker thread.

        botocore reads its configuration (``~/.aws/config``, ``~/.aws/credentials``) and
        its JSON models (the S3 API, its endpoint rules, partitions, defaults) from disk
        the first time a session needs them, and keeps them. Creating the client on the
        event loop would do that there; loading them here first leaves the client's
        creation only cached data to read.
        """
        session = self._session or aioboto3.Session(
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            region_name=self.region,
            profile_name=self._profile,
        )
        core = session._session  # the botocore session aioboto3 wraps
        core.get_scoped_config()
        core._get_internal_component("endpoint_resolver")
        loader = core.get_component("data_loader")
        # the arguments as the client passes them: the loader caches by them
        loader.load_service_model("s3", "service-2", api_version=None)
        loader.load_service_model("s3", "endpoint-rule-set-1", api_version=None)
        loader.load_data("partitions")
        loader.load_data("sdk-default-configuration")
        return session

    async def _ensure_bucket(self) -> None:
        try:
            async with self._driver("HeadBucket", ""):
                await self._client.head_bucket(Bucket=self.bucket)
            return
        except _Missing as missing:
            if not self.create_bucket:
                raise ConfigurationError(
                    f"S3 bucket {self.bucket!r} does not exist and create_bucket=false"
                ) from missing.__cause__
        params: dict[str, Any] = {"Bucket": self.bucket}
        region = self.region or self._client.meta.region_name
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        async with self._driver("CreateBucket", ""):
            await self._client.create_bucket(**params)

    async def aclose(self) -> None:
        """Close the client. Idempotent; the store cannot be reopened."""
        async with self._open_lock:
            stack, self._stack = self._stack, None
            self._client = None
            self._life.close()
            if stack is not None:
                await stack.aclose()

    def _opened(self) -> Any:
        self._life.require()
        return self._client

    @contextlib.asynccontextmanager
    async def _driver(self, op: str, key: str | None, *,
                      timed: bool = True) -> AsyncIterator[None]:
        """Run one driver call within ``self.deadline`` seconds (``timed``).

        Its errors leave as tierstore errors (see ``_translate``); running out of time
        leaves as ``TierUnavailable`` saying the request timed out.
        """
        deadline = asyncio.timeout(self.deadline if timed else None)
        try:
            async with deadline:
                yield
        except (TierstoreError, _Missing):
            raise
        except DRIVER_ERRORS as exc:
            where = f"s3://{self.bucket}/{self.prefix}{key or ''}"
            if deadline.expired():
                raise TierUnavailable(
                    f"S3 {op} on {where}: timed out after {self.deadline:g}s (max_attempts x "
                    "(connect_timeout + read_timeout) plus retry backoff)",
                    tier="cold", backend="s3",
                ) from exc
            translated = _translate(exc, op=op, where=where)
            if translated is None:
                return
            raise translated from exc

    # -- keys -----------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"object key must be a non-empty string, got {key!r}")
        full = self.prefix + key
        try:
            size = len(full.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"object key {key!r} is not valid Unicode text") from exc
        if size > _MAX_KEY_BYTES:
            raise InvalidInput(
                f"object key is {size} bytes with its prefix; S3 allows {_MAX_KEY_BYTES}"
            )
        return full

    def _put_class(self, storage_class: str | None) -> str:
        if storage_class is None:
            return self.storage_class
        try:
            return _storage_class(storage_class, source="put argument")
        except ConfigurationError as exc:
            raise InvalidInput(str(exc)) from None

    # -- ObjectStore ------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, *, storage_class: str | None = None) -> None:
        client = self._opened()
        full = self._full_key(key)
        klass = self._put_class(storage_class)
        if len(data) <= self.multipart_threshold:
            # S3 computes the SHA-256 of the bytes it receives, refuses the put when it
            # differs from the one sent along, and keeps it: ``info`` reports it, so
            # the archive verifies a segment without reading it back.
            async with self._driver("PutObject", key):
                await client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data),
                                        StorageClass=klass, ChecksumAlgorithm="SHA256")
            return
        await self._put_multipart(client, key, full, data, klass)

    async def _put_multipart(
        self, client: Any, key: str, full: str, data: bytes, klass: str
    ) -> None:
        async with self._driver("CreateMultipartUpload", key):
            created = await client.create_multipart_upload(
                Bucket=self.bucket, Key=full, StorageClass=klass, ChecksumAlgorithm="CRC32"
            )
        upload_id = str(created["UploadId"])
        try:
            parts = await self._upload_parts(client, key, full, upload_id, data)
            async with self._driver("CompleteMultipartUpload", key):
                await client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            await self._abort(client, key, full, upload_id)
            raise

    async def _upload_parts(
        self, client: Any, key: str, full: str, upload_id: str, data: bytes
    ) -> list[dict[str, Any]]:
        # S3 allows 10,000 parts: a huge object gets bigger parts rather than failing.
        size = max(self.part_size, -(-len(data) // _MAX_PARTS))
        gate = asyncio.Semaphore(_PART_CONCURRENCY)

        async def one(number: int, start: int) -> dict[str, Any]:
            async with gate, self._driver("UploadPart", key):
                answer = await client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                    Body=bytes(data[start:start + size]), ChecksumAlgorithm="CRC32",
                )
            part: dict[str, Any] = {"PartNumber": number, "ETag": answer["ETag"]}
            if answer.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = answer["ChecksumCRC32"]
            return part

        tasks = [asyncio.create_task(one(n, start))
                 for n, start in enumerate(range(0, len(data), size), start=1)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # Stop sibling parts before the abort, so none lands after it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _abort(self, client: Any, key: str, full: str, upload_id: str) -> None:
        """Best effort: the error that made the upload fail is the one the caller sees."""
        try:
            async with self._driver("AbortMultipartUpload", key):
                await client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                    UploadId=upload_id)
        except TierstoreError as exc:
            log.warning("could not abort multipart upload %s of %s: %s (a bucket lifecycle "
                        "rule for incomplete uploads will remove its parts)", upload_id, key, exc)

    async def get(self, key: str) -> bytes | None:
        client = self._opened()
        full = self._full_key(key)
        try:
            async with self._driver("GetObject", key):
                answer = await client.get_object(Bucket=self.bucket, Key=full)
                async with answer["Body"] as body:
                    data: bytes = await body.read()
            return data
        except _Missing:
            return None
        except CheckpointArchived as exc:
            head = await self._head(client, key, full)
            raise CheckpointArchived(
                f"{key!r} is in {head.storage_class if head else exc.storage_class} and must be "
                f"restored before it can be read (restore {self._restore_word(head)})",
                key=key,
                storage_class=head.storage_class if head else exc.storage_class,
                restore_state=head.restore_state if head else exc.restore_state,
            ) from exc.__cause__

    @staticmethod
    def _restore_word(head: _Head | None) -> str:
        state = head.restore_state if head else "not-started"
        return {"in-progress": "in progress", "ready": "just finished"}.get(state, "not started")

    async def _head(self, client: Any, key: str, full: str) -> _Head | None:
        try:
            async with self._driver("HeadObject", key):
                answer = await client.head_object(Bucket=self.bucket, Key=full,
                                                  ChecksumMode="ENABLED")
        except _Missing:
            return None
        klass = str(answer.get("StorageClass") or "STANDARD")
        modified = answer.get("LastModified")
        return _Head(
            size=int(answer.get("ContentLength", 0)),
            storage_class=klass,
            restore_state=restore_state(klass, answer.get("Restore"), answer.get("ArchiveStatus")),
            modified=modified.timestamp() if isinstance(modified, datetime) else 0.0,
            sha256=_whole_object_sha256(answer),
        )

    async def info(self, key: str) -> ObjectInfo | None:
        client = self._opened()
        head = await self._head(client, key, self._full_key(key))
        if head is None:
            return None
        return ObjectInfo(
            key=key, size=head.size, storage_class=head.storage_class,
            readable=head.restore_state in ("not-needed", "ready"),
            restore_state=head.restore_state, modified=head.modified, sha256=head.sha256,
        )

    async def delete(self, keys: Sequence[str]) -> None:
        client = self._opened()
        full = list(dict.fromkeys(self._full_key(k) for k in keys))
        batchable = [k for k in full if not _XML_UNSAFE.search(k)]
        for start in range(0, len(batchable), _DELETE_BATCH):
            batch = batchable[start:start + _DELETE_BATCH]
            async with self._driver("DeleteObjects", batch[0][len(self.prefix):]):
                answer = await client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise TierUnavailable(
                    f"S3 DeleteObjects on s3://{self.bucket}/{self.prefix}: {len(errors)} of "
                    f"{len(batch)} keys not deleted (first: {first.get('Key')!r}, "
                    f"{first.get('Code')}: {first.get('Message')})",
                    tier="cold", backend="s3",
                )
        for full_key in full:
            if _XML_UNSAFE.search(full_key):
                async with self._driver("DeleteObject", full_key[len(self.prefix):]):
                    await client.delete_object(Bucket=self.bucket, Key=full_key)

    async def iter_keys(self, prefix: str) -> AsyncIterator[str]:
        client = self._opened()
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix,
                                  "MaxKeys": _LIST_PAGE}
        while True:
            # botocore asks for url-encoded keys and decodes them, so any key survives XML.
            async with self._driver("ListObjectsV2", prefix):
                page = await client.list_objects_v2(**params)
            for item in page.get("Contents") or ():
                yield str(item["Key"])[len(self.prefix):]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    async def restore(self, key: str, *, days: int | None = None) -> str:
        """Start a restore unless one is under way or done; returns the restore state.

        ``days`` (default: the URL's ``restore_days``) is how long the restored copy
        stays readable; the tier (``restore_tier``) trades cost for speed.
        """
        client = self._opened()
        full = self._full_key(key)
        head = await self._head(client, key, full)
        if head is None:
            raise InvalidInput(f"cannot restore {key!r}: no such object")
        if head.restore_state in ("not-needed", "in-progress", "ready"):
            return head.restore_state
        request: dict[str, Any] = {
            "Days": days if days is not None else self.restore_days,
            "GlacierJobParameters": {"Tier": self.restore_tier},
        }
        try:
            async with self._driver("RestoreObject", key):
                answer = await client.restore_object(Bucket=self.bucket, Key=full,
                                                     RestoreRequest=request)
        except CheckpointArchived as exc:  # RestoreAlreadyInProgress: someone else started it
            return exc.restore_state
        # 202: the copy is being made; 200: a readable copy already exists.
        status = int(answer.get("ResponseMetadata", {}).get("HTTPStatusCode", 202))
        return "ready" if status == 200 else "in-progress"
