"""The prefill stage through real processes: FastKV requests flow E -> P -> D and decode from the
compressed KV (tokens equal to the same computation in one process), keep-everything FastKV is
the lossless path, bad settings are refused with the field named; a deployment default applies
to requests that do not say."""

from __future__ import annotations

import pytest

from epdserve.engine.sampler import SamplingParams
from epdserve.errors import InvalidArgumentError
from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.sdk import Client

pytestmark = pytest.mark.e2e

PROMPT = " ".join(f"item{i} is number {i * 7 % 13}." for i in range(40)) + " Which item is number 5?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", "clip", 5, num_layers=4)


@pytest.fixture(scope="module")
def client(model_dir):
    with LocalCluster(ClusterConfig(model_dir=model_dir, device="cpu")) as cluster:
        with Client(cluster.router_address, timeout_s=120) as client:
            yield client


def _reference(model_dir, fastkv) -> list[int]:
    """Prefill with FastKV and decode in this process, from the prompt the router builds."""
    from epdserve.models.loader import load_decoder
    from epdserve.models.prompt import PromptBuilder
    from epdserve.models.spec import load_spec
    from services.decode.decoder import TokenDecoder
    from services.prefill.prefill import PromptPrefiller

    spec = load_spec(model_dir)
    decoder = load_decoder(spec, device="cpu")
    ids = PromptBuilder(spec).build(PROMPT, 0, False).token_ids
    greedy = SamplingParams(temperature=0.0)
    result = PromptPrefiller(spec, decoder).run(list(ids), [], greedy, fastkv=fastkv)
    steps = TokenDecoder(decoder)
    seq = steps.load(result.kv_layers, result.first_token_id, NEW_TOKENS, greedy, result.length)
    return [result.first_token_id] + [steps.step(seq) for _ in range(NEW_TOKENS - 1)]


def test_fastkv_request_decodes_from_the_compressed_kv(client, model_dir):
    from services.prefill.fastkv import FastKVConfig

    result = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, fastkv=True)
    length = result.usage.prompt_tokens
    assert length > 200
    budget = -(-length // 10)  # retain_rate 0.1
    assert result.timings_ms["prefill.kv_tokens_stored"] == 4 * budget
    assert list(result.token_ids) == _reference(model_dir, FastKVConfig())


def test_fastkv_keeping_everything_is_the_lossless_path(client):
    lossless = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    kept = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                           fastkv={"tsp_rate": 1.0, "retain_rate": 1.0})
    assert kept.token_ids == lossless.token_ids
    assert kept.timings_ms["prefill.kv_tokens_stored"] == 4 * lossless.usage.prompt_tokens


@pytest.mark.parametrize("settings,message", [
    ({"tsp_rate": 1.5}, r"params.fastkv: fastkv tsp_rate must be in \(0, 1\]"),
    ({"retain_rate": -0.1}, r"params.fastkv: fastkv retain_rate must be in \(0, 1\]"),
    ({"kv_budget": -3}, r"params.fastkv: fastkv tsp_length and kv_budget must be >= 0"),
])
def test_bad_fastkv_settings_are_refused(client, settings, message):
    with pytest.raises(InvalidArgumentError, match=message):
        client.generate(PROMPT, max_tokens=1, fastkv=settings)


def test_fastkv_deployment_default_and_per_request_opt_out(model_dir):
    config = ClusterConfig(model_dir=model_dir, device="cpu", stage_args={"prefill": ("--fastkv",)})
    with LocalCluster(config) as cluster, Client(cluster.router_address, timeout_s=120) as client:
        default = client.generate(PROMPT, max_tokens=1)
        opted_out = client.generate(PROMPT, max_tokens=1, fastkv=False)
    assert default.timings_ms["prefill.kv_tokens_stored"] < 4 * default.usage.prompt_tokens
    assert opted_out.timings_ms["prefill.kv_tokens_stored"] == 4 * opted_out.usage.prompt_tokens


def test_a_prompt_waits_for_room_for_its_kv_and_one_that_never_fits_is_refused(model_dir):
    """The prefill's cache pool holds one prompt's KV, not two: prompts sent together are
    prefilled one after another as decode takes the KV before them (none fails); a prompt whose
    KV is larger than the whole pool is RESOURCE_EXHAUSTED at once, naming the flag to raise."""
    import concurrent.futures

    from epdserve.errors import ResourceExhaustedError
    from epdserve.models.prompt import PromptBuilder
    from epdserve.models.spec import load_spec

    spec = load_spec(model_dir)
    length = len(PromptBuilder(spec).build(PROMPT, 0, False).token_ids)
    kv_bytes = spec.decoder.kv_bytes_per_token * 4 * length   # float32 on CPU
    pool = ("--capacity-bytes", str(kv_bytes * 3 // 2))   # the prefix cache's blocks live there too
    config = ClusterConfig(model_dir=model_dir, device="cpu", stage_args={"prefill": pool})
    with LocalCluster(config) as cluster, Client(cluster.router_address, timeout_s=120) as client:
        alone = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            together = list(threads.map(lambda _: client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0,
                                                                  ignore_eos=True), range(4)))
        with pytest.raises(ResourceExhaustedError, match=r"token_ids: the KV of this \d+-token prompt \(\d+ bytes\) "
                                                             r"cannot fit the cache pool .* raise --capacity-bytes"):
            client.generate(PROMPT * 2, max_tokens=1)
        again = client.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        report = _load_report(cluster.children["prefill"].address)
    assert all(r.token_ids == alone.token_ids for r in together + [again])
    assert report.kv_bytes_per_token == spec.decoder.kv_bytes_per_token * 4   # what the router places by
    assert 0 < report.kv_pool_room_bytes <= kv_bytes * 3 // 2
    assert max(r.timings_ms["prefill.kv_wait_ms"] for r in together) > 5.0   # someone waited for a decode to take KV


def _load_report(address: str):
    import grpc

    from epdserve.v1 import load_pb2, load_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return load_pb2_grpc.LoadServiceStub(channel).GetLoad(load_pb2.GetLoadRequest(), timeout=10)


def test_decode_takes_no_more_kv_than_held_kv_gib_and_the_rest_waits_in_the_prefill_pool(model_dir):
    """Decode's paged KV holds one sequence and --held-kv-gib one prompt's KV: of four requests
    sent together, later ones wait before decode fetches their KV (`decode.held_kv_wait_ms`),
    leaving it in the prefill's pool, and every one answers with the tokens of a request alone."""
    import concurrent.futures

    from epdserve.models.prompt import PromptBuilder
    from epdserve.models.spec import load_spec

    spec = load_spec(model_dir)
    length = len(PromptBuilder(spec).build(PROMPT, 0, False).token_ids)
    kv_bytes = spec.decoder.kv_bytes_per_token * 4 * length   # float32 on CPU
    decode = ("--held-kv-gib", f"{kv_bytes * 1.2 / 2**30:.9f}",
              "--kv-cache-gib", f"{kv_bytes * 1.5 / 2**30:.9f}", "--no-local-prefill")
    config = ClusterConfig(model_dir=model_dir, device="cpu", stage_args={"decode": decode})
    with LocalCluster(config) as cluster, Client(cluster.router_address, timeout_s=120) as client:
        alone = client.generate(PROMPT, max_tokens=4 * NEW_TOKENS, temperature=0.0, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            together = list(threads.map(lambda _: client.generate(PROMPT, max_tokens=4 * NEW_TOKENS, temperature=0.0,
                                                                  ignore_eos=True), range(4)))
    assert all(r.token_ids == alone.token_ids for r in together)
    waits = sorted(r.timings_ms["decode.held_kv_wait_ms"] for r in together)
    assert waits[0] < 1.0 and waits[-1] > 5.0   # the first went straight in; later ones waited their turn
