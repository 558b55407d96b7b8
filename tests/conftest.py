"""Shared fixtures: a real private redis-server, tiny random checkpoints built on disk,
and the marker plumbing (`slow` needs --run-slow; `gpu` needs CUDA)."""

from __future__ import annotations

import pathlib
import uuid

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    has_gpu = _cuda_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real redis-server started for this test session (skips when none is installed)."""
    import shutil

    from epdserve.redis_server import PrivateRedis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    server = PrivateRedis().start()
    yield server.url
    server.stop()


@pytest.fixture
def namespace() -> str:
    """A Redis key namespace unique to one test, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


_CHECKPOINTS: dict[tuple, pathlib.Path] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """build(backbone="llama", vision="clip", seed=0) -> path of a tiny random LLaVA checkpoint
    (built once per session per argument set)."""
    from epdserve.models.tiny import TinySpec, build_tiny_checkpoint

    def build(backbone: str = "llama", vision: str = "clip", seed: int = 0, **options) -> pathlib.Path:
        key = (backbone, vision, seed, tuple(sorted(options.items())))
        if key not in _CHECKPOINTS:
            out = tmp_path_factory.mktemp(f"tiny-{backbone}-{vision}-{seed}")
            spec = TinySpec(backbone=backbone, vision=vision, seed=seed, **options)
            _CHECKPOINTS[key] = build_tiny_checkpoint(out, spec)
        return _CHECKPOINTS[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory) -> pathlib.Path:
    return tiny_checkpoint_factory()
