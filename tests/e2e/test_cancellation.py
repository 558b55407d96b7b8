"""Cancellation and deadlines reach every stage: a client cancel injected while the request is in
the router, encoding, prefilling, waiting for its KV hand-off, or decoding leaves no call running
on any stage within 200 ms (each replica's load report is the witness), frees the request id, and
the router keeps serving; a client deadline shorter than the pipeline ends every stage's call too.
Stages run `--zero-work` with a 400 ms service time per call / token, so the boundaries are
reachable by the clock."""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.v1 import common_pb2, load_pb2, load_pb2_grpc, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.e2e
STAGE_S = 0.4
STAGES = ("encode", "prefill", "decode")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    zero = ("--zero-work", "--zero-work-delay-ms", str(STAGE_S * 1000))
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu",
                           stage_args={"encode": zero, "prefill": zero, "decode": zero})
    with LocalCluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def stubs(cluster):
    channels = {name: grpc.insecure_channel(cluster.children[name].address) for name in STAGES}
    router_channel = grpc.insecure_channel(cluster.router_address)
    yield router_pb2_grpc.RouterServiceStub(router_channel), \
        {name: load_pb2_grpc.LoadServiceStub(channel) for name, channel in channels.items()}
    for channel in [*channels.values(), router_channel]:
        channel.close()


def _request(request_id: str) -> router_pb2.GenerateRequest:
    greedy = common_pb2.SamplingParams(temperature=0)
    params = router_pb2.GenerationParams(max_tokens=6, ignore_eos=True, sampling=greedy)
    return router_pb2.GenerateRequest(request_id=request_id, prompt="Describe it.", params=params,
                                      images=[common_pb2.ImageInput(data=_png())])


def _in_flight(loads) -> dict[str, int]:
    reports = {name: stub.GetLoad(load_pb2.GetLoadRequest(), timeout=5) for name, stub in loads.items()}
    return {name: r.queued_requests + r.running_requests for name, r in reports.items()}


def _drained_after(loads, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while any(_in_flight(loads).values()):
        assert time.monotonic() - start < timeout_s, f"still in flight: {_in_flight(loads)}"
        time.sleep(0.005)
    return time.monotonic() - start


# (boundary, cancel time, the stage that must be holding the request then)
BOUNDARIES = [
    ("router, before encode", 0.0, None),
    ("encoding", STAGE_S * 0.5, "encode"),
    ("prefilling", STAGE_S * 1.5, "prefill"),
    ("waiting for the KV hand-off", STAGE_S * 2.5, "decode"),
    ("decoding", STAGE_S * 4.5, "decode"),
]


@pytest.mark.parametrize("boundary, at_s, holder", BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_a_client_cancel_reaches_every_stage_within_200_ms(stubs, boundary, at_s, holder):
    router, loads = stubs
    request_id = f"cancel-{boundary.split()[0].strip(',')}"
    call = router.Generate(_request(request_id), timeout=30)
    received: list = []
    reader = threading.Thread(target=lambda: _drain(call, received))
    reader.start()
    time.sleep(at_s)
    if holder is not None:
        assert _in_flight(loads)[holder] == 1, f"the request is not at {holder} at {at_s} s"
    call.cancel()
    reader.join(timeout=5)
    assert _drained_after(loads) < 0.2
    assert received[-1] == grpc.StatusCode.CANCELLED
    again = list(router.Generate(_request(request_id), timeout=30))  # the id is free, the router serves
    assert again[-1].complete.finish_reason == "length"


def test_a_client_deadline_ends_every_stage_call(stubs):
    router, loads = stubs
    with pytest.raises(grpc.RpcError) as info:
        list(router.Generate(_request("deadline"), timeout=STAGE_S * 1.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _drained_after(loads) < 0.2


def _drain(call, received: list) -> None:
    try:
        for response in call:
            received.append(response)
        received.append(grpc.StatusCode.OK)
    except grpc.RpcError as exc:
        received.append(exc.code())
