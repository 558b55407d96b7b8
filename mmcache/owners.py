"""Owner liveness: registration, heartbeats, and the janitor that removes a dead owner's entries.

An owner is one process start (its id carries a random epoch, so a restarted service is a new
owner). It registers itself and beats twice every `interval_s`, each key expiring after
`ttl_intervals` missed beats: from its event loop (`alive`: it answers; lookups offer only such
owners' entries) and from a thread of its own (`live`: its process runs, even while a model load
or a compile blocks the event loop). Any owner's janitor (off the request path) drops the index
entries of owners with neither beat and, on the same host, their leftover shared memory. A silent
owner on the same host whose process still holds its pool file (stopped, or cut off from Redis)
is alive too, and is left alone: removing its file would leave it serving from memory no reader
on the host can map.

Invariant: an owner whose process runs and reaches Redis keeps its index entries, however long
its event loop is blocked; a killed owner's entries leave the index within a TTL plus a janitor
round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import socket
import threading

from mmcache.guard import RedisGuard
from mmcache.index import RedisIndex
from mmcache.pool import held_by_a_live_owner

log = logging.getLogger(__name__)
_BATCH = 500


@dataclasses.dataclass(frozen=True)
class OwnerInfo:
    owner_id: str           # unique per process start (the epoch)
    host_id: str
    control_address: str    # gRPC address serving CacheControl ("" if none)
    data_address: str = ""  # data channel address ("" until the data server runs)
    store_dir: str = ""     # where its bytes live on its host (cleaned up if it dies)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


class ProcessBeat:
    """Refreshes an owner's `live` key from a daemon thread on a Redis connection of its own, at
    once and then every `interval_s`, until `stop` or the process ends. Redis errors are left to the
    event loop's heartbeat to notice; the thread tries again at the next beat."""

    def __init__(self, redis_url: str, key: str, *, interval_s: float, ttl_s: float, timeout_s: float) -> None:
        self.redis_url, self.key = redis_url, key
        self.interval_s, self.ttl_ms, self.timeout_s = interval_s, int(ttl_s * 1000), timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mmcache-process-beat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; returns when the thread has (or after a Redis timeout, if a beat hangs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1.0)

    def _run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=self.timeout_s,
                                      socket_connect_timeout=self.timeout_s)
        try:
            while not self._stop.is_set():
                try:
                    client.set(self.key, "1", px=self.ttl_ms)
                except (redis.RedisError, OSError):
                    pass
                self._stop.wait(self.interval_s)
        finally:
            client.close()


def local_host_id() -> str:
    try:
        boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


class OwnerRegistry:
    def __init__(self, index: RedisIndex, guard: RedisGuard, owner: OwnerInfo, *, interval_s: float,
                 ttl_intervals: int = 3) -> None:
        self.index, self.guard, self.owner = index, guard, owner
        self.interval_s = interval_s
        self.ttl_s = interval_s * ttl_intervals
        self._spared: set[str] = set()  # silent owners found alive on this host (warned once each)

    async def heartbeat(self) -> None:
        """(Re-)register and refresh the heartbeat; also how an owner reappears after a Redis restart."""
        redis, o = self.index.redis, self.owner

        async def run():
            pipe = redis.pipeline(transaction=False)
            pipe.hset(self.index.owners_key, o.owner_id, o.to_json())
            pipe.set(self.index.alive_key(o.owner_id), "1", px=int(self.ttl_s * 1000))
            await pipe.execute()

        await self.guard.run(run)

    async def unregister(self, held_keys: list[str]) -> None:
        """On a clean stop: drop this owner's entries and registration."""
        redis, owner = self.index.redis, self.owner.owner_id

        async def run():
            pipe = redis.pipeline(transaction=False)
            for start in range(0, len(held_keys), _BATCH):
                pipe.delete(*(self.index.entry_key(k) for k in held_keys[start : start + _BATCH]))
            pipe.delete(self.index.owned_key(owner), self.index.alive_key(owner), self.index.live_key(owner))
            pipe.hdel(self.index.owners_key, owner)
            await pipe.execute()

        await self.guard.run(run)

    async def collect_dead(self) -> list[OwnerInfo]:
        """The janitor: find owners without a heartbeat, drop their entries and registration, and
        remove their leftover store directories on this host. Returns the owners removed."""
        redis = self.index.redis
        owners = await self.guard.run(lambda: redis.hgetall(self.index.owners_key))
        if not owners:
            return []
        ids = [k.decode() if isinstance(k, bytes) else k for k in owners]

        async def alive():   # either beat: it answers, or at least its process runs
            pipe = redis.pipeline(transaction=False)
            for owner in ids:
                pipe.exists(self.index.alive_key(owner), self.index.live_key(owner))
            return await pipe.execute()

        flags = await self.guard.run(alive)
        dead = [owner for owner, up in zip(ids, flags) if not up]
        removed = []
        for owner in dead:
            info = _parse_owner(owners.get(owner.encode(), owners.get(owner)))
            if info is not None and self._alive_here(info):
                continue
            await self._drop_owner(owner)
            if info is not None:
                removed.append(info)
                if info.host_id == self.owner.host_id and info.owner_id != self.owner.owner_id:
                    remove_owner_files(pathlib.Path(info.store_dir), info.owner_id)
        return removed

    def _alive_here(self, info: OwnerInfo) -> bool:
        """A silent owner on this host whose process still holds its pool file."""
        if info.host_id != self.owner.host_id or not info.store_dir:
            return False
        if not held_by_a_live_owner(pool_file(pathlib.Path(info.store_dir), info.owner_id)):
            return False
        if info.owner_id not in self._spared:
            self._spared.add(info.owner_id)
            log.warning("cache owner %s missed its heartbeats but its process still holds its pool: kept (stopped, or "
                        "cut off from Redis, for over %.1f s)", info.owner_id, self.ttl_s)
        return True

    async def _drop_owner(self, owner: str) -> None:
        redis = self.index.redis
        members = await self.guard.run(lambda: redis.smembers(self.index.owned_key(owner)))
        keys = [m.decode() if isinstance(m, bytes) else m for m in members]

        async def run():
            pipe = redis.pipeline(transaction=False)
            for start in range(0, len(keys), _BATCH):
                pipe.delete(*(self.index.entry_key(k) for k in keys[start : start + _BATCH]))
            pipe.delete(self.index.owned_key(owner))
            pipe.hdel(self.index.owners_key, owner)
            await pipe.execute()

        await self.guard.run(run)
        log.info("owner %s is gone: dropped %d index entries", owner, len(keys))


def pool_file(store_dir: pathlib.Path, owner_id: str) -> pathlib.Path:
    return store_dir / f"pool-{owner_id}.shm"


def disk_dir(store_dir: pathlib.Path, owner_id: str) -> pathlib.Path:
    return store_dir / f"disk-{owner_id}"


def remove_owner_files(store_dir: pathlib.Path, owner_id: str) -> None:
    """Remove exactly the files an owner created (its pool file and disk-spill directory), then the
    store directory if that left it empty. Nothing else is touched."""
    if not str(store_dir):
        return
    pool_file(store_dir, owner_id).unlink(missing_ok=True)
    shutil.rmtree(disk_dir(store_dir, owner_id), ignore_errors=True)
    try:
        store_dir.rmdir()
    except OSError:
        pass


def _parse_owner(raw) -> OwnerInfo | None:
    try:
        return OwnerInfo(**json.loads(raw))
    except (TypeError, ValueError):
        return None
