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
