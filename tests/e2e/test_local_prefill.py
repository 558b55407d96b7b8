"""E -> PD through real processes: the decode service prefills a prompt itself and streams every
token, the same tokens the router's E -> P -> D path gives; bad prompts get the field named."""

from __future__ import annotations

import grpc
import pytest

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client
from epdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

pytestmark = pytest.mark.e2e

PROMPT = "Describe a quiet harbour at dawn in three short sentences."
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    with LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def decode(cluster):
    with grpc.insecure_channel(cluster.children["decode"].address) as channel:
        yield decode_pb2_grpc.DecodeServiceStub(channel)


def _prompt_ids(model_dir) -> list[int]:
    from epdserve.models.prompt import PromptBuilder
    from epdserve.models.spec import load_spec

    return list(PromptBuilder(load_spec(model_dir)).build(PROMPT, 0, False).token_ids)


def _local(decode, token_ids, max_new=NEW_TOKENS, request_id="local") -> list[decode_pb2.DecodeResponse]:
    request = decode_pb2.DecodeRequest(
        request_id=request_id, max_new_tokens=max_new, ignore_eos=True,
        sampling=common_pb2.SamplingParams(temperature=0.0), prompt=decode_pb2.LocalPrompt(token_ids=token_ids))
    return list(decode.Decode(request, timeout=60))


def test_local_prefill_streams_the_tokens_of_the_disaggregated_path(cluster, decode, tiny_checkpoint):
    with Client(cluster.router_address, timeout_s=60) as client:
        remote = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    responses = _local(decode, _prompt_ids(tiny_checkpoint))
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == list(remote.token_ids)
    assert responses[-1].finish_reason == "length"


@pytest.mark.parametrize("change,message", [
    (lambda ids: ids + [10 ** 6], "prompt.token_ids: token id 1000000 is outside the vocabulary"),
    (lambda ids: ids * 400, "local prefill limit"),
    (lambda ids: [], "prompt must not be empty"),
])
def test_bad_local_prompts_are_invalid_argument(decode, tiny_checkpoint, change, message):
    with pytest.raises(grpc.RpcError) as info:
        _local(decode, change(_prompt_ids(tiny_checkpoint)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_kv_and_prompt_together_are_refused(decode, tiny_checkpoint):
    request = decode_pb2.DecodeRequest(
        request_id="both", max_new_tokens=2, kv=common_pb2.KVHandle(layers=[common_pb2.TensorRef(key="x")], length=3),
        prompt=decode_pb2.LocalPrompt(token_ids=_prompt_ids(tiny_checkpoint)))
    with pytest.raises(grpc.RpcError) as info:
        list(decode.Decode(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exclusive" in info.value.details()
