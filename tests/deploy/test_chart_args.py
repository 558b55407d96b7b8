"""The chart's container arguments are ones the services accept: every rendered Deployment's args,
for every example values file, parse with the real service's flag parser and build its frozen
configs (so a renamed flag or a value a config refuses fails here, not in a crash-looping pod)."""

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


def _deployments(example):
    values = {} if example is None else yaml.safe_load((CHART / "examples" / f"{example}.yaml").read_text())
    rendered = helm.Chart.load(CHART).render(values, name="epd", namespace="llm")
    docs = [d for name, text in rendered.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e or "defaults" for e in EXAMPLES])
def test_every_stage_accepts_its_rendered_arguments(example):
    for stage, deployment in _deployments(example).items():
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["serve", stage]
        argv = [a.replace("$(POD_IP)", "10.0.0.7") for a in args[2:]]
        if stage == "router":
            parsed = service_arg_parser("router", RouterConfig, with_cache=False).parse_args(argv)
            classes = (ServerConfig, ModelConfig, RouterConfig, SecurityConfig)
        else:
            parsed = service_arg_parser(stage, STAGE_CONFIGS[stage]).parse_args(argv)
            classes = (ServerConfig, ModelConfig, CacheConfig, STAGE_CONFIGS[stage], SecurityConfig)
        configs = [config_from_args(cls, parsed) for cls in classes]
        assert configs[0].host == "0.0.0.0" and configs[0].advertise_host == "10.0.0.7"
        if example == "gpu-h100x8":  # token and mutual TLS from the mounted Secrets; probes on the health port
            assert configs[-1] == SecurityConfig("/etc/epdserve/auth/token", "/etc/epdserve/tls/tls.crt",
                                                 "/etc/epdserve/tls/tls.key", "/etc/epdserve/tls/ca.crt",
                                                 "epdserve.internal")
            assert configs[0].health_port == 8081
