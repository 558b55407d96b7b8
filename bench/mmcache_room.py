"""What asking "is there room for this reservation?" costs as the cache pool fills with entries.

A prefill replica reserves every prompt's KV in its pool, and its load report (polled by the
router) says how much room the pool has. Both need what eviction could free: the bytes of the
unleased entries. Counted in full, that walks every cached entry (a prefill keeps many thousands of
prefix blocks); counted only until it is enough (`TieredStore.evictable_bytes(tier, enough)`, what
`MMCache.room_bytes(enough=...)` and reservations use), it stops at the first entries. Both ways
are timed here, on the same store, in the same run; the pool is kept full so that the count is
needed at all (with free room a reservation skips it).

    python bench/mmcache_room.py [--entries 1000,10000,100000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENTRY_BYTES = 256
META = {"dtype": "uint8", "shape": [ENTRY_BYTES], "checksum": ""}


def measure(entries: int, folder: pathlib.Path, repeats: int = 20) -> dict:
    from mmcache.pool import SharedMemoryPool, region_bytes
    from mmcache.store import TieredStore
    from mmcache.tiers import HostTier

    pool = SharedMemoryPool(folder / f"pool-{entries}.shm", entries * region_bytes(ENTRY_BYTES))
    store = TieredStore(HostTier(pool), None, None)
    for i in range(entries):
        store.put(f"kvb:{i}", memoryview(bytes(ENTRY_BYTES)), META, ttl_s=3600)
    need = 16 * region_bytes(ENTRY_BYTES)   # a reservation of 16 entries' worth: the pool is full

    def per_call_ms(call) -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - started) / repeats * 1000.0

    full = per_call_ms(lambda: store.evictable_bytes("host"))
    enough = per_call_ms(lambda: store.evictable_bytes("host", need))
    return {"entries": entries, "pool_free_bytes": pool.free_bytes, "full_count_ms": full, "until_enough_ms": enough}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", default="1000,10000,100000")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if pathlib.Path("/dev/shm").is_dir() else None) as folder:
        rows = [measure(int(n), pathlib.Path(folder)) for n in args.entries.split(",")]
    result = {"date": datetime.date.today().isoformat(), "hardware": f"{platform.processor() or 'x86_64'}, "
              f"{platform.platform()}", "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mmcache-room.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Room check in a full cache pool ({result['date']}, {result['hardware']})", "",
             "| cached entries | counted in full (ms) | counted until enough (ms) |", "|---:|---:|---:|"]
    lines += [f"| {r['entries']:,} | {r['full_count_ms']:.3f} | {r['until_enough_ms']:.4f} |" for r in rows]
    (out / "mmcache-room.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
