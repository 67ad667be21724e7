"""Placeholder mappings in Redis, shared by every proxy that uses the same Redis and namespace.

Layout (``ns`` is the namespace, ``aws-masker`` by default)::

    {ns}:fwd:{hex}          -> placeholder       hex = HMAC-SHA256(hmac_key, kind NUL original); has a TTL
    {ns}:rev:{placeholder}  -> sealed original   for restore across the namespace; has a TTL
    {ns}:ctr:{kind}         -> last number used  never expires, never reset

* Key names never contain an original: the forward key is a keyed HMAC (without the key, a guessed
  account id cannot even be confirmed), the reverse key holds the placeholder.
* One Lua script per call looks every item up or mints it (INCR the per-kind counter, SET both
  directions) and refreshes the TTL of every mapping it touched, so two proxies that meet a new
  identifier at the same moment agree on one placeholder, and a request costs ONE round trip whatever
  its size (batches above ``chunk_size`` items are several script calls sent in one pipeline). The items
  travel as one length-prefixed argument, not as hundreds of keys and arguments.
* Each proxy remembers the mappings it got in the last ``remember`` seconds (60 by default) and answers
  them without a round trip: a mapping never changes while it lives, and a conversation sends the same
  identifiers every turn. A remembered item is asked again after ``remember`` seconds, which refreshes its
  TTL in Redis, so a mapping in use lives at least ``ttl - remember`` seconds after its last use. A request
  whose identifiers are all remembered is masked even while Redis is down. Should Redis, after losing its
  data, give a new original a placeholder the proxy remembers for another in the same request, the proxy
  forgets all it remembers and asks for the whole request again.
* Counters have no TTL on purpose: a counter that expired or was reset would hand out numbers again,
  and a number still present in a conversation would then be restored to another original. They are a
  few bytes per kind. Run Redis with ``maxmemory-policy noeviction`` or a ``volatile-*`` policy (every
  mapping key has a TTL, counters do not, so only mappings can be evicted). As a second guard the script
  skips any number whose reverse key still exists. If Redis loses its data (restart without
  persistence) numbering starts again at 0001: enable AOF/RDB if placeholders must outlive a Redis restart.
* Values: with ``enc_key`` the original is sealed with AES-256-GCM (random 96-bit nonce, associated data
  = namespace + kind) as ``b"e" + key_id(4) + nonce(12) + ciphertext+tag``; the key id is 4 bytes of
  SHA-256 over a label and the key. Without ``enc_key`` the original is stored as it is, behind the
  one-byte tag ``b"p"`` (readable by anyone who can read Redis; the key names still leak nothing).

Keys and rotation
-----------------
``keys_from_secret(secret)`` derives two independent 32-byte keys with HKDF-SHA256 (``info`` tells them
apart): the HMAC key for forward key names and the AES key for values. ``load_store_key(value)`` takes the
secret itself or the path of a file holding it (``/``, ``./``, ``../`` or ``~`` in front means a path, which
then must exist). Every proxy of a namespace must use the same secret.

Rotating the secret keeps every placeholder (nothing is re-minted). Pass the old keys as
``previous_keys=[keys_from_secret(old)]``:

* lookups try the forward key of the current HMAC key first, then those of the previous keys; a hit
  through an old key writes the forward key under the current key (the old one is left to expire);
* reads decrypt with the key named by the key id, i.e. the current or any previous key;
* every use of a mapping re-seals its original with the current key when it was sealed with another key
  (or stored plain), so all that is left under an old key is mappings unused since the rotation, which
  expire within ``ttl``.

Procedure for several proxies: (1) give every proxy the new secret as a previous key (they can now read
what step 2 writes); (2) make the new secret current and the old one previous, proxy by proxy;
(3) one ``ttl`` (7 days by default) after the last proxy switched, drop the old secret. Changing only the
encryption key (or turning encryption on or off) works the same way, forward keys are then unchanged.
Placeholders whose value cannot be decrypted with any configured key are left out of ``originals_for``.

Failures (refused, timeout, auth, OOM, script errors) raise ``StoreUnavailable`` with a short reason that
never holds an original. The connection pool reconnects by itself on the next call once Redis is back.
The script looks up keys it derives itself (reverse keys and counters), so it is for a single Redis
(or a primary with replicas), not Redis Cluster. Needs Redis >= 6.2 (GETEX).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Collection, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .placeholders import TOKEN_RE, valid_kind
from .store import StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "aws-masker"
DEFAULT_TTL = 604_800
DEFAULT_REMEMBER = 60  # seconds a proxy answers a mapping it got from Redis without asking again
REMEMBER_ENTRIES = 20_000  # ... and how many it keeps at most (~0.3 KB each: ~6 MB)
CHUNK_SIZE = 1000
MIN_SECRET_LEN = 16

_PLAIN = b"p"
_SEALED = b"e"
_KID_LEN = 4
_NONCE_LEN = 12

# ARGV: key prefix ("{ns}:"), ttl, number of previous HMAC keys, prefix of a value sealed with the current
# key (or the plain tag), the items, the placeholders not to mint (the request holds them as text; space
# separated, maybe none), and last, when the HMAC key is the generated shared one, that key:
# written again (NX), so a proxy started after Redis lost its data adopts the key of the proxies already
# running. The items are ONE argument (packing hundreds of arguments costs the client more than the script
# costs Redis): per item, as <length>:<bytes> fields, the kind, the sealed original, the hex HMAC of the
# forward key under the current HMAC key and then one per previous HMAC key.
# Placeholder format is that of placeholders.format_placeholder: AWS_<KIND>_<number, at least 4 digits>.
LOOKUP_OR_MINT = """
local ns = ARGV[1]
local ttl = tonumber(ARGV[2])
local nprev = tonumber(ARGV[3])
local vprefix = ARGV[4]
local blob = ARGV[5]
local plen = string.len(vprefix)
local fwdns = ns .. 'fwd:'
local avoid = {}
for t in string.gmatch(ARGV[6], '%S+') do
  avoid[t] = true
end
if ARGV[7] then
  redis.call('SET', ns .. 'meta:hmac-key', ARGV[7], 'NX')
end
local pos = 1
local size = string.len(blob)
local function field()
  local colon = string.find(blob, ':', pos, true)
  local n = tonumber(string.sub(blob, pos, colon - 1))
  pos = colon + n + 1
  return string.sub(blob, colon + 1, colon + n)
end
local out = {}
while pos <= size do
  local kind = field()
  local value = field()
  local fwd = fwdns .. field()
  local prev = {}
  for j = 1, nprev do
    prev[j] = fwdns .. field()
  end
  local p = redis.call('GETEX', fwd, 'EX', ttl)
  if not p then
    for j = 1, nprev do
      p = redis.call('GET', prev[j])
      if p then
        redis.call('SET', fwd, p, 'EX', ttl)
        break
      end
    end
  end
  if p then
    local rev = ns .. 'rev:' .. p
    local cur = redis.call('GETEX', rev, 'EX', ttl)
    if (not cur) or string.sub(cur, 1, plen) ~= vprefix then
      redis.call('SET', rev, value, 'EX', ttl)
    end
  else
    local ctr = ns .. 'ctr:' .. kind
    repeat
      p = 'AWS_' .. kind .. '_' .. string.format('%04d', redis.call('INCR', ctr))
    until (not avoid[p]) and redis.call('SET', ns .. 'rev:' .. p, value, 'NX', 'EX', ttl)
    redis.call('SET', fwd, p, 'EX', ttl)
  end
  out[#out + 1] = p
end
return table.concat(out, ' ')
"""
LOOKUP_OR_MINT_SHA = hashlib.sha1(LOOKUP_OR_MINT.encode()).hexdigest()


# -- keys ---------------------------------------------------------------------------------------------------

def keys_from_secret(secret: str) -> tuple[bytes, bytes]:
    """``(hmac_key, enc_key)``: two independent 32-byte keys derived from ``secret`` with HKDF-SHA256."""
    raw = secret.encode()
    if len(raw) < MIN_SECRET_LEN:
        raise ValueError(f"store secret too short (need at least {MIN_SECRET_LEN} bytes; if you meant a "
                         "file, write its path as ./name or in full)")

    def derive(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"aws-masker store v1", info=info).derive(raw)

    return derive(b"aws-masker forward-key hmac"), derive(b"aws-masker value encryption")


def load_store_key(value: str) -> str:
    """The store secret: ``value`` itself, or the content of the file it names (surrounding blanks removed).

    A value starting with ``/``, ``./``, ``../`` or ``~``, or ending like a key file's name (``.key``,
    ``.pem``, ``.txt``, ``.secret``), is always a path: a mistyped path is an error, never silently used as
    the secret.
    """
    value = value.strip()
    looks_like_path = value.startswith(("/", "./", "../", "~")) or \
        value.lower().endswith((".key", ".pem", ".txt", ".secret"))
    path = os.path.expanduser(value)
    if looks_like_path or os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ValueError(f"cannot read store key file {value}: {e.strerror}") from None
        if mode & 0o077:
            log.warning("store key file %s is readable by group or others; chmod 600 it", value)
    else:
        secret = value
    if not secret:
        raise ValueError("store key is empty")
    return secret


def key_id(enc_key: bytes) -> bytes:
    return hashlib.sha256(b"aws-masker key id\0" + enc_key).digest()[:_KID_LEN]


class _Sealer:
    """Seals originals with the current key, opens them with the current or any previous key."""

    def __init__(self, enc_key: bytes | None, previous: Sequence[bytes]) -> None:
        for k in (enc_key, *previous):
            if k is not None and len(k) != 32:
                raise ValueError("encryption keys must be 32 bytes (AES-256)")
        self.current = AESGCM(enc_key) if enc_key is not None else None
        self.prefix = _SEALED + key_id(enc_key) if enc_key is not None else _PLAIN
        self.by_id: dict[bytes, list[AESGCM]] = {}
        for k in (enc_key, *previous):
            if k is not None:
                self.by_id.setdefault(key_id(k), []).append(AESGCM(k))

    def seal(self, aad: bytes, original: bytes) -> bytes:
        if self.current is None:
            return _PLAIN + original
        nonce = os.urandom(_NONCE_LEN)
        return self.prefix + nonce + self.current.encrypt(nonce, original, aad)

    def open(self, aad: bytes, value: bytes) -> bytes | None:
        tag = value[:1]
        if tag == _PLAIN:
            return value[1:]
        if tag != _SEALED:
            return None
        kid = value[1:1 + _KID_LEN]
        nonce = value[1 + _KID_LEN:1 + _KID_LEN + _NONCE_LEN]
        body = value[1 + _KID_LEN + _NONCE_LEN:]
        for aes in self.by_id.get(kid, ()):
            try:
                return aes.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        return None


# -- client -------------------------------------------------------------------------------------------------

def make_redis_pool(url: str, *, connect_timeout: float = 1.0, timeout: float = 1.0,
                    max_connections: int = 2, pool_timeout: float = 1.0, health_check_interval: int = 30,
                    retries: int = 1, client_name: str | None = "aws-masker",
                    **kwargs: Any) -> BlockingConnectionPool:
    """The one connection pool of a proxy process (store and event publisher share it).

    ``redis://``, ``rediss://`` (TLS; ``ssl_*`` keyword arguments pass through) and
    ``redis://:password@host`` / ``redis://user:password@host`` are accepted. At most ``max_connections``
    connections are opened; a caller waits up to ``pool_timeout`` seconds for a free one. Connect and
    read time out after ``connect_timeout`` / ``timeout`` seconds. A connection error is retried
    ``retries`` times at once (a connection the server closed, e.g. after a Redis restart, is replaced
    without failing the call; the store's script is idempotent, so a resend is harmless); timeouts are not
    retried: we fail fast. A connection idle for more than ``health_check_interval`` seconds is PINGed
    before its next use.
    """
    return BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        health_check_interval=health_check_interval,
        retry=Retry(NoBackoff(), retries, supported_errors=(rexc.ConnectionError,)),
        client_name=client_name,
        decode_responses=False,
        **kwargs,
    )


def make_redis_client(url: str, **kwargs: Any) -> Redis:
    """A client owning a new pool from ``make_redis_pool`` (same keyword arguments).

    Share this one client between the store and the event publisher of a process; ``await
    client.aclose()`` closes the pool.
    """
    return Redis.from_pool(make_redis_pool(url, **kwargs))


def _reason(e: BaseException) -> str:
    """A short description of a Redis failure that cannot contain an original."""
    if isinstance(e, rexc.AuthenticationError | rexc.AuthorizationError):
        return f"redis auth failed ({type(e).__name__})"
    if isinstance(e, rexc.TimeoutError | TimeoutError):
        return "redis timeout"
    if isinstance(e, rexc.ConnectionError | OSError):
        # Raised by the connection layer: host, port and errno, nothing from a command.
        return "redis connection failed: " + str(e)[:160]
    if isinstance(e, rexc.ResponseError):
        # Only the error code (ERR, OOM, READONLY, ...): the message of a pipeline error quotes the command.
        code = getattr(e, "status_code", None)
        if not isinstance(code, str) or not code:
            first = str(e).rsplit("caused error: ", 1)[-1].split(" ", 1)[0]
            code = first if first.isalpha() and first.isupper() else type(e).__name__
        code = code[:20]
        if code in ("NOAUTH", "WRONGPASS", "NOPERM"):
            return f"redis auth failed ({code})"
        return f"redis error {code}"
    return f"redis error ({type(e).__name__})"


class RedisStore:
    """``Store`` backed by Redis; see the module docstring."""

    name = "redis"

    def __init__(self, client_or_pool: Redis | ConnectionPool, namespace: str = DEFAULT_NAMESPACE,
                 ttl: int = DEFAULT_TTL, *, hmac_key: bytes | None, enc_key: bytes | None = None,
                 previous_keys: Sequence[tuple[bytes, bytes | None]] = (), chunk_size: int = CHUNK_SIZE,
                 owns_client: bool = False, remember: float = DEFAULT_REMEMBER,
                 remember_entries: int = REMEMBER_ENTRIES) -> None:
        if isinstance(client_or_pool, ConnectionPool):
            self.client = Redis(connection_pool=client_or_pool)  # does not close the shared pool
            self._owns_client = True
        else:
            self.client = client_or_pool
            self._owns_client = owns_client
        if self.client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False")
        if not namespace or any(c in namespace for c in "{}\0 \r\n"):
            raise ValueError("invalid Redis namespace")
        if int(ttl) < 1:
            raise ValueError("ttl must be at least 1 second")
        if hmac_key is not None and len(hmac_key) < 16:
            raise ValueError("hmac_key too short")
        if remember < 0 or remember_entries < 1:
            raise ValueError("remember must be at least 0 seconds and remember_entries at least 1")
        self.namespace = namespace
        self.ttl = int(ttl)
        self.chunk_size = max(1, chunk_size)
        self._prefix = namespace + ":"
        # Without a configured secret (hmac_key None) the HMAC key is generated once per namespace and kept
        # in Redis (``{ns}:meta:hmac-key``), so every proxy of the namespace uses the same one.
        self._hmac_keys: list[bytes] = [hmac_key] if hmac_key is not None else []
        for h, _ in previous_keys:
            if h not in self._hmac_keys:
                self._hmac_keys.append(h)
        self._sealer = _Sealer(enc_key, [e for _, e in previous_keys if e is not None])
        self._shared_key: bytes | None = None  # the generated key read from Redis, re-published by the script
        # Mappings this proxy got from Redis in the last ``remember`` seconds, oldest first: a mapping never
        # changes while it lives, so they are answered without a round trip (a conversation resends its
        # identifiers every turn). After ``remember`` seconds an item is asked again, which refreshes its TTL
        # in Redis: each proxy refreshes a mapping it keeps using at least that often.
        self.remember = min(float(remember), self.ttl / 2)
        self._remember_entries = remember_entries
        self._remembered: dict[tuple[str, bytes], tuple[bytes, float]] = {}
        self._now = time.monotonic

    @classmethod
    def from_url(cls, url: str, namespace: str = DEFAULT_NAMESPACE, ttl: int = DEFAULT_TTL, *,
                 hmac_key: bytes | None, enc_key: bytes | None = None,
                 previous_keys: Sequence[tuple[bytes, bytes | None]] = (), chunk_size: int = CHUNK_SIZE,
                 remember: float = DEFAULT_REMEMBER, remember_entries: int = REMEMBER_ENTRIES,
                 **client_kwargs: Any) -> RedisStore:
        """A store with its own client, closed by ``close()``; ``client_kwargs`` go to ``make_redis_pool``."""
        return cls(make_redis_client(url, **client_kwargs), namespace, ttl, hmac_key=hmac_key,
                   enc_key=enc_key, previous_keys=previous_keys, chunk_size=chunk_size, owns_client=True,
                   remember=remember, remember_entries=remember_entries)

    # -- key material ---------------------------------------------------------------------------------
    def forward_key(self, kind: str, original: bytes, hmac_key: bytes | None = None) -> str:
        msg = kind.encode("ascii") + b"\0" + original
        return f"{self._prefix}fwd:{hmac.digest(hmac_key or self._hmac_keys[0], msg, 'sha256').hex()}"

    def reverse_key(self, placeholder: bytes) -> bytes:
        return self._prefix.encode() + b"rev:" + placeholder

    def counter_key(self, kind: str) -> str:
        return f"{self._prefix}ctr:{kind}"

    def _aad(self, kind: bytes) -> bytes:
        return b"aws-masker v1\0" + self._prefix.encode() + b"\0" + kind

    # -- Store protocol -------------------------------------------------------------------------------
    async def _shared_hmac_key(self) -> None:
        key = self._prefix + "meta:hmac-key"
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(key, os.urandom(32), nx=True)
                pipe.get(key)
                _, value = await pipe.execute()
        except (rexc.RedisError, OSError) as e:
            raise StoreUnavailable(_reason(e)) from None
        if not isinstance(value, bytes) or len(value) < 16:
            raise StoreUnavailable("redis error (bad shared hmac key)")
        if not self._hmac_keys:
            self._hmac_keys.append(value)
            self._shared_key = value

    async def placeholders_for(self, items: Sequence[tuple[str, bytes]],
                               avoid: Collection[bytes] = ()) -> list[bytes]:
        if not items:
            return []
        if self.remember <= 0:
            return await self._lookup_or_mint(items, avoid)
        now = self._now()
        remembered = self._remembered
        horizon = now - self.remember
        while remembered:  # forget what is too old to answer (oldest first: dicts keep insertion order)
            first = next(iter(remembered))
            if remembered[first][1] > horizon:
                break
            del remembered[first]
        found = [remembered.get(item) for item in items]
        missing = [item for item, hit in zip(items, found, strict=True) if hit is None]
        if not missing:
            return [hit[0] for hit in found]  # type: ignore[index]
        new = await self._lookup_or_mint(missing, avoid)
        answered = {hit[0] for hit in found if hit is not None}
        if not answered.isdisjoint(new):
            # Redis gave a new original a placeholder this proxy remembers for another: it lost its data
            # (restart without persistence, flush) and counts from 0001 again. Nothing remembered can be
            # trusted; the whole request is asked again, so its originals get distinct placeholders.
            remembered.clear()
            out = await self._lookup_or_mint(items, avoid)
            for item, placeholder in zip(items, out, strict=True):
                remembered[item] = (placeholder, now)
            return out
        fetched = iter(new)
        out = []
        for item, hit in zip(items, found, strict=True):
            if hit is None:
                placeholder = next(fetched)
                remembered[item] = (placeholder, now)
            else:
                placeholder = hit[0]
            out.append(placeholder)
        while len(remembered) > self._remember_entries:
            del remembered[next(iter(remembered))]
        return out

    async def _lookup_or_mint(self, items: Sequence[tuple[str, bytes]],
                              avoid: Collection[bytes]) -> list[bytes]:
        avoiding = b" ".join(p for p in avoid if TOKEN_RE.fullmatch(p))
        if not self._hmac_keys:
            await self._shared_hmac_key()
        calls = []
        hmac_keys = self._hmac_keys
        seal = self._sealer.seal
        digest = hmac.digest
        for start in range(0, len(items), self.chunk_size):
            fields: list[bytes] = []
            for kind, original in items[start:start + self.chunk_size]:
                if not valid_kind(kind):
                    raise ValueError("invalid placeholder kind")
                k = kind.encode("ascii")
                value = seal(self._aad(k), original)
                msg = k + b"\0" + original
                fields.append(b"%d:%s%d:%s" % (len(k), k, len(value), value))
                fields += [b"64:%s" % digest(h, msg, "sha256").hex().encode() for h in hmac_keys]
            argv: list[bytes | str | int] = [self._prefix, self.ttl, len(hmac_keys) - 1, self._sealer.prefix,
                                             b"".join(fields), avoiding]
            if self._shared_key is not None:
                argv.append(self._shared_key)
            calls.append((0, *argv))
        results = await self._run_scripts(calls)
        out = [p for chunk_result in results for p in chunk_result.split(b" ")]
        if len(out) != len(items):
            raise StoreUnavailable("redis error (unexpected script reply)")
        return out

    async def _run_scripts(self, calls: list[tuple[Any, ...]]) -> list[bytes]:
        try:
            try:
                return await self._send(calls, "EVALSHA", LOOKUP_OR_MINT_SHA)
            except rexc.NoScriptError:
                # Script cache empty (Redis restarted, SCRIPT FLUSH): EVAL also caches it again.
                return await self._send(calls, "EVAL", LOOKUP_OR_MINT)
        except (rexc.RedisError, OSError) as e:
            raise StoreUnavailable(_reason(e)) from None

    async def _send(self, calls: list[tuple[Any, ...]], command: str, script: str) -> list[bytes]:
        if len(calls) == 1:
            return [await self.client.execute_command(command, script, *calls[0])]
        async with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command(command, script, *call)
            return list(await pipe.execute())

    async def originals_for(self, placeholders: Sequence[bytes]) -> dict[bytes, bytes]:
        wanted = [p for p in dict.fromkeys(placeholders) if TOKEN_RE.fullmatch(p)]
        if not wanted:
            return {}
        try:
            values = await self.client.mget([self.reverse_key(p) for p in wanted])
        except (rexc.RedisError, OSError) as e:
            raise StoreUnavailable(_reason(e)) from None
        out: dict[bytes, bytes] = {}
        undecryptable = 0
        for p, value in zip(wanted, values, strict=True):
            if not isinstance(value, bytes):
                continue
            original = self._sealer.open(self._aad(p[4:p.rindex(b"_")]), value)
            if original is None:
                undecryptable += 1
                continue
            out[p] = original
        if undecryptable:
            log.warning("%d placeholder value(s) in namespace %s could not be decrypted with the configured "
                        "store keys", undecryptable, self.namespace)
        return out

    async def ping(self) -> float:
        """Round trip time of a PING in seconds; raises ``StoreUnavailable`` when Redis does not answer."""
        t0 = time.perf_counter()
        try:
            await self.client.ping()
        except (rexc.RedisError, OSError) as e:
            raise StoreUnavailable(_reason(e)) from None
        return time.perf_counter() - t0

    async def close(self) -> None:
        if self._owns_client:
            try:
                await self.client.aclose()
            except (rexc.RedisError, OSError):  # pragma: no cover - best effort
                pass
