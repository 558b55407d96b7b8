"""The chart's container arguments are ones the services accept: every rendered Deployment's args,
for every example values file, parse with the real service's flag parser and build its frozen
configs (so a renamed flag or a value a config refuses fails here, not in a crash-looping pod);
with encode.colocated the prefill pods take the encode flags and the router sends encode there."""

from __future__ import annotations

import pathlib

import pytest

helm = pytest.importorskip("helm_python", reason="test extra: helm-python-sdk")
yaml = pytest.importorskip("yaml")

from epdserve.config import (  # noqa: E402
    CacheConfig,
    DecodeConfig,
    EncodeConfig,
    ModelConfig,
    PrefillConfig,
    RouterConfig,
    SecurityConfig,
    ServerConfig,
    config_from_args,
)
from services.runtime import service_arg_parser  # noqa: E402

pytestmark = pytest.mark.unit
CHART = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "helm" / "epdserve"
EXAMPLES = [None, *sorted(p.stem for p in (CHART / "examples").glob("*.yaml"))]
STAGE_CONFIGS = {"encode": EncodeConfig, "prefill": PrefillConfig, "decode": DecodeConfig}


def _deployments(example, values=None):
    if values is None:
        values = {} if example is None else yaml.safe_load((CHART / "examples" / f"{example}.yaml").read_text())
    rendered = helm.Chart.load(CHART).render(values, name="epd", namespace="llm")
    docs = [d for name, text in rendered.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}


def _parsed_configs(stage: str, args: list[str]) -> list:
    """The configs `epdserve serve <stage>` builds from a container's args, SecurityConfig last; a
    prefill --with-encode also takes (and builds) EncodeConfig, before SecurityConfig."""
    assert args[:2] == ["serve", stage]
    argv = [a.replace("$(POD_IP)", "10.0.0.7") for a in args[2:]]
    if stage == "router":
        parsed = service_arg_parser("router", RouterConfig, with_cache=False).parse_args(argv)
        classes = (ServerConfig, ModelConfig, RouterConfig, SecurityConfig)
    else:
        also = (EncodeConfig,) if stage == "prefill" and "--with-encode" in argv else ()
        parsed = service_arg_parser(stage, STAGE_CONFIGS[stage], also=also).parse_args(argv)
        classes = (ServerConfig, ModelConfig, CacheConfig, STAGE_CONFIGS[stage], *also, SecurityConfig)
    return [config_from_args(cls, parsed) for cls in classes]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e or "defaults" for e in EXAMPLES])
def test_every_stage_accepts_its_rendered_arguments(example):
    for stage, deployment in _deployments(example).items():
        configs = _parsed_configs(stage, deployment["spec"]["template"]["spec"]["containers"][0]["args"])
        assert configs[0].host == "0.0.0.0" and configs[0].advertise_host == "10.0.0.7"
        if example == "gpu-h100x8":  # token and mutual TLS from the mounted Secrets; probes on the health port
            assert configs[-1] == SecurityConfig("/etc/epdserve/auth/token", "/etc/epdserve/tls/tls.crt",
                                                 "/etc/epdserve/tls/tls.key", "/etc/epdserve/tls/ca.crt",
                                                 "epdserve.internal")
            assert configs[0].health_port == 8081


def test_colocated_prefill_takes_the_encode_flags_and_the_router_sends_encode_there():
    encode_args = ["--max-batch-size", "8", "--max-batch-wait-ms", "1.5", "--scorer", "feature-norm",
                   "--max-images-per-request", "4"]
    deployments = _deployments(None, {"encode": {"colocated": True, "args": encode_args},
                                      "prefill": {"replicas": 1, "gpus": 1, "args": ["--fastkv"]}})
    args = {stage: d["spec"]["template"]["spec"]["containers"][0]["args"] for stage, d in deployments.items()}
    assert set(args) == {"prefill", "decode", "router"}
    assert args["prefill"][-len(encode_args) - 1:] == ["--with-encode", *encode_args]
    _, _, _, prefill, encode, _ = _parsed_configs("prefill", args["prefill"])
    assert prefill.with_encode and prefill.fastkv
    assert (encode.max_batch_size, encode.max_batch_wait_ms, encode.scorer, encode.max_images_per_request) == (
        8, 1.5, "feature-norm", 4)
    router = _parsed_configs("router", args["router"])[2]
    assert router.encode_colocated and router.encode == ()
    assert router.prefill == ("k8s://llm/epd-epdserve-prefill:grpc",)
    assert router.decode == ("k8s://llm/epd-epdserve-decode:grpc",)
    for stage in ("decode", "router"):  # the encode flags are the prefill pods' only
        assert "--max-batch-size" not in args[stage]
