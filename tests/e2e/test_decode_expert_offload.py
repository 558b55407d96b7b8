"""A decode service started with --expert-cache-rate (MoE experts in host memory behind a GPU expert
cache, ProMoE prefetch) serves the tiny Mixtral checkpoint: through the router (E -> P -> D) and
through its own local prefill (E -> PD) it streams the tokens the all-resident model generates
in-process."""

from __future__ import annotations

import grpc
import pytest
import torch

from epdserve.engine.generation import generate
from epdserve.engine.sampler import SamplingParams
from epdserve.errors import FailedPreconditionError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.models.loader import load_decoder
from epdserve.models.prompt import PromptBuilder
from epdserve.models.spec import load_spec
from epdserve.sdk import Client
from epdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

pytestmark = pytest.mark.e2e

PROMPT = "Name three colours of the sea."
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("mixtral", "clip", 11, num_layers=4)


@pytest.fixture(scope="module")
def cluster(model_dir):
    offload = ("--expert-cache-rate", "0.5", "--expert-prefetch", "skip-gate")
    with LocalCluster(ClusterConfig(model_dir=model_dir, device="cpu", dtype="float32",
                                    stage_args={"decode": offload})) as cluster:
        yield cluster


def _resident_tokens(model_dir, token_ids: list[int]) -> list[int]:
    decoder = load_decoder(load_spec(model_dir), dtype="float32", device="cpu")
    with torch.inference_mode():
        embeds = decoder.embed(torch.tensor([token_ids]))[0]
    return list(generate(decoder, embeds, NEW_TOKENS, SamplingParams(temperature=0.0), ignore_eos=True))


def test_offloaded_experts_serve_the_resident_models_tokens(cluster, model_dir):
    token_ids = list(PromptBuilder(load_spec(model_dir)).build(PROMPT, 0, False).token_ids)
    expected = _resident_tokens(model_dir, token_ids)
    with Client(cluster.router_address, timeout_s=60) as client:
        routed = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert list(routed.token_ids) == expected
    request = decode_pb2.DecodeRequest(
        request_id="local", max_new_tokens=NEW_TOKENS, ignore_eos=True,
        sampling=common_pb2.SamplingParams(temperature=0.0), prompt=decode_pb2.LocalPrompt(token_ids=token_ids))
    with grpc.insecure_channel(cluster.children["decode"].address) as channel:
        responses = list(decode_pb2_grpc.DecodeServiceStub(channel).Decode(request, timeout=60))
    assert [t for r in responses for t in r.token_ids] == expected


def test_a_dense_checkpoint_with_expert_offloading_fails_at_start(tiny_checkpoint):
    config = ClusterConfig(model_dir=tiny_checkpoint, device="cpu", start_timeout_s=120,
                           stage_args={"decode": ("--expert-cache-rate", "0.5")})
    with pytest.raises(FailedPreconditionError, match="decode service exited with code 1(.|\n)*MoE checkpoint"):
        with LocalCluster(config):
            pass
