"""mmcache building blocks without Redis: keys, codec, the shared-memory store."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from mmcache.codec import CorruptEntryError, checksum, tensor_bytes, tensor_from_buffer, verify
from mmcache.keys import image_key, processor_digest, validate_key
from mmcache.store import CapacityError, SharedMemoryStore

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _key(image, **overrides):
    args = {"model_revision": "rev1", "processor_digest": "proc1", **overrides}
    return image_key(image, **args)


def test_image_key_is_stable_across_processes_and_hash_seeds():
    code = ("from PIL import Image; from mmcache.keys import image_key; "
            "print(image_key(Image.new('RGB', (5, 3), (1, 2, 3)), model_revision='r', processor_digest='p'))")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == _key(Image.new("RGB", (5, 3), (1, 2, 3)), model_revision="r", processor_digest="p")


def test_image_key_distinguishes_everything_that_matters():
    base = Image.new("RGB", (4, 6), (10, 20, 30))
    keys = {
        _key(base),
        _key(Image.frombytes("RGB", (6, 4), base.tobytes())),          # same bytes, transposed size
        _key(Image.frombytes("L", (12, 6), base.tobytes())),           # same bytes, other mode
        _key(Image.new("RGB", (4, 6), (10, 20, 31))),                  # one channel differs
        _key(base, model_revision="rev2"),
        _key(base, processor_digest="proc2"),
        _key(base, tenant_salt=b"tenant-a"),
    }
    assert len(keys) == 7
    assert _key(base) == _key(base.copy())


def test_processor_digest_ignores_key_order():
    assert processor_digest({"a": 1, "b": [1, 2]}) == processor_digest({"b": [1, 2], "a": 1})
    assert processor_digest({"a": 1}) != processor_digest({"a": 2})


@pytest.mark.parametrize("key", ["", "x" * 201, "a/b", "../etc/passwd", "key with space", "é"])
def test_bad_keys_are_rejected(key):
    from epdserve.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        validate_key(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (2, 1, 4)])
def test_codec_round_trip(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    data = bytearray(tensor_bytes(tensor))
    name = str(dtype).removeprefix("torch.")
    back = tensor_from_buffer(data, name, shape)
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, tensor)


def test_codec_rejects_wrong_length_and_checksum():
    data = bytearray(tensor_bytes(torch.ones(4)))
    with pytest.raises(CorruptEntryError, match="needs 12"):
        tensor_from_buffer(data, "float32", (3,))
    digest = checksum(data)
    verify(data, digest)
    data[0] ^= 1
    with pytest.raises(CorruptEntryError, match="checksum"):
        verify(data, digest)


def test_store_write_is_atomic_and_readable(tmp_path):
    store = SharedMemoryStore(tmp_path / "s", capacity_bytes=1000)
    written = store.write("k1", b"abc", ttl_s=60)
    assert bytes(store.open_read("k1")) == b"abc"
    assert [p.name for p in (tmp_path / "s").iterdir()] == [written.entry.path.name]  # no temp file left


def test_store_evicts_least_recently_used_by_bytes(tmp_path):
    store = SharedMemoryStore(tmp_path / "s", capacity_bytes=300)
    for key in ("a", "b", "c"):
        store.write(key, b"x" * 100, ttl_s=60)
    store.touch("a", 60)                                  # a is now the most recently used
    result = store.write("d", b"y" * 100, ttl_s=60)
    assert result.evicted == ["b"]
    assert sorted(store.keys()) == ["a", "c", "d"] and store.used_bytes == 300
    with pytest.raises(CapacityError, match="exceeds the cache capacity"):
        store.write("huge", b"z" * 301, ttl_s=60)


def test_store_expiry_delete_and_close(tmp_path):
    store = SharedMemoryStore(tmp_path / "s", capacity_bytes=1000)
    store.write("short", b"1", ttl_s=0.01)
    store.write("long", b"2", ttl_s=60)
    time.sleep(0.02)
    assert store.expired() == ["short"]
    assert store.open_read("short") is None
    assert store.delete("unknown") is False
    mapped = store.open_read("long")
    assert store.delete("long") is True
    assert bytes(mapped) == b"2"                          # an unlinked file stays readable through its mapping
    store.close()
    assert not (tmp_path / "s").exists()


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
UNSAFE_CALLS = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("zmq", "recv_pyobj")}


def _unsafe_uses(path: pathlib.Path) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if (owner, node.func.attr) in UNSAFE_CALLS or node.func.attr == "recv_pyobj":
                found.append(f"{owner}.{node.func.attr}()")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append("allow_pickle=")
    return found


def test_no_unsafe_deserialization_in_the_sources():
    """No pickle-family import, torch.load / np.load, recv_pyobj or allow_pickle anywhere we ship."""
    offenders = []
    for package in ("mmcache", "epdserve", "services", "tuner", "bench", "scripts"):
        for path in (ROOT / package).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)}: {use}" for use in _unsafe_uses(path)]
    assert offenders == []


def test_the_unsafe_use_scanner_catches_what_it_should(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import pickle\nfrom dill import loads\nimport torch\ntorch.load('x')\n"
                      "np.load('y', allow_pickle=True)\nsock.recv_pyobj()\n")
    assert len(_unsafe_uses(sample)) == 6
