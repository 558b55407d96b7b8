"""The committed stubs in epdserve/v1 are exactly what scripts/gen_protos.py generates from protos/."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    generated = _gen_module().generate(tmp_path)
    assert generated, "no stubs generated"
    for path in generated:
        committed = ROOT / "epdserve" / "v1" / path.name
        assert committed.is_file(), f"{path.name} is not committed: run scripts/gen_protos.py"
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale: run scripts/gen_protos.py"


def test_tensors_never_travel_as_float_lists():
    for proto in (ROOT / "protos" / "epdserve" / "v1").glob("*.proto"):
        for line in proto.read_text().splitlines():
            assert not line.strip().startswith(("repeated float", "repeated double")), f"{proto.name}: {line}"


def test_every_service_proto_is_importable():
    from epdserve.v1 import cache_pb2_grpc, decode_pb2_grpc, encode_pb2_grpc, prefill_pb2_grpc, router_pb2_grpc

    for module in (cache_pb2_grpc, decode_pb2_grpc, encode_pb2_grpc, prefill_pb2_grpc, router_pb2_grpc):
        assert any(name.endswith("Stub") for name in dir(module))
