"""What a local cluster passes its services: on a GPU every stage shares it, so decode's automatic
KV cache takes a bounded share (split over its replicas) unless the user sized it."""

from __future__ import annotations

import pathlib

import pytest

from epdserve.launcher import COLOCATED_DECODE_KV_FRACTION, ClusterConfig, LocalCluster

pytestmark = pytest.mark.unit


def _decode_args(**config) -> dict[str, list[str]]:
    cluster = LocalCluster(ClusterConfig(model_dir=pathlib.Path("/nonexistent"), **config))
    cluster.redis_url = "redis://127.0.0.1:1"
    try:
        return {name: cluster._stage_args("decode", name) for name in cluster.config.names("decode")}
    finally:
        cluster.stop()


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_on_a_gpu_decode_replicas_share_a_bounded_kv_fraction():
    args = _decode_args(device="cuda", replicas={"decode": 2})
    assert {_flag(a, "--kv-cache-fraction") for a in args.values()} == {f"{COLOCATED_DECODE_KV_FRACTION / 2:.3f}"}


@pytest.mark.parametrize("flag", ["--kv-cache-gib", "--kv-cache-fraction"])
def test_a_user_sized_kv_cache_is_left_alone(flag):
    args = _decode_args(device="cuda", stage_args={"decode": (flag, "0.5")})["decode"]
    assert args.count(flag) == 1 and _flag(args, flag) == "0.5"
    assert "--kv-cache-fraction" not in args or flag == "--kv-cache-fraction"


def test_on_the_cpu_nothing_is_added():
    assert "--kv-cache-fraction" not in _decode_args(device="cpu")["decode"]


@pytest.mark.parametrize("fraction", [0.0, 0.99])
def test_a_kv_fraction_outside_its_range_is_refused(fraction):
    from epdserve.config import DecodeConfig

    with pytest.raises(ValueError, match="kv_cache_fraction"):
        DecodeConfig(kv_cache_fraction=fraction)


def test_cluster_dirs_of_killed_launchers_are_removed_and_live_ones_kept(tmp_path):
    """A launcher killed before it could stop leaves its shared-memory pools and logs behind; the
    next launcher removes them: dirs whose pid file nobody holds locked any more (the lock goes with
    its process, however it ended), and unclaimed dirs (older code) where nothing changed for an
    hour. A live launcher's dir, an unclaimed dir with a recent write, and other files stay."""
    import fcntl
    import os
    import time

    from epdserve.launcher import CLUSTER_DIR_PREFIX, LAUNCHER_PID_FILE, remove_abandoned_cluster_dirs

    dirs = {name: tmp_path / f"{CLUSTER_DIR_PREFIX}{name}" for name in ("dead", "alive", "old", "old-but-written")}
    for directory in dirs.values():
        (directory / "prefill").mkdir(parents=True)
        (directory / "prefill" / "pool.shm").write_bytes(b"x")
    (dirs["dead"] / LAUNCHER_PID_FILE).write_text("1")        # a pid that is alive: only the lock counts
    live = os.open(dirs["alive"] / LAUNCHER_PID_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(live, fcntl.LOCK_EX)
    hour_ago = time.time() - 3700
    for name in ("old", "old-but-written"):
        for path in [dirs[name], *dirs[name].rglob("*")]:
            os.utime(path, (hour_ago, hour_ago))
    (dirs["old-but-written"] / "prefill" / "pool.shm").write_bytes(b"y")   # a live older launcher's pool
    (tmp_path / "unrelated").mkdir()
    try:
        removed = remove_abandoned_cluster_dirs(tmp_path)
    finally:
        os.close(live)
    assert sorted(removed) == sorted([dirs["dead"], dirs["old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [dirs["alive"].name, dirs["old-but-written"].name, "unrelated"])


def test_a_claimed_directory_is_abandoned_only_once_its_claim_is_released(tmp_path):
    import os

    from epdserve.launcher import CLUSTER_DIR_PREFIX, _claim, remove_abandoned_cluster_dirs

    mine = tmp_path / f"{CLUSTER_DIR_PREFIX}mine"
    claim = _claim(mine)
    try:
        assert remove_abandoned_cluster_dirs(tmp_path) == []    # even this process cannot take its lock
    finally:
        os.close(claim)                                          # as when the launcher's process ends
    assert remove_abandoned_cluster_dirs(tmp_path) == [mine] and not mine.exists()
