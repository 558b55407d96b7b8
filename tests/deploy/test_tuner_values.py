"""The tuner's exported values.yaml installs with the chart: layered over the defaults and over the
CPU example (as `helm install -f mine.yaml -f values.yaml` would), it passes the schema, renders
valid Kubernetes objects with the candidate's replica counts and GPUs, and every flag it adds is
one the stage accepts; a colocated candidate (E+P) gets no encode pods and its encode flags on the
prefill pods."""

from __future__ import annotations

import pathlib

import pytest

helm = pytest.importorskip("helm_python", reason="test extra: helm-python-sdk")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test extra: kubernetes-validate")
yaml = pytest.importorskip("yaml")

from epdserve.config import DecodeConfig, EncodeConfig, PrefillConfig, RouterConfig, config_from_args  # noqa: E402
from services.runtime import service_arg_parser  # noqa: E402
from tuner.report import helm_values  # noqa: E402
from tuner.sim import Candidate  # noqa: E402

pytestmark = pytest.mark.unit
CHART = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "helm" / "epdserve"
CANDIDATES = {
    "split": Candidate(3, 2, 5, encode_max_batch=16, encode_max_wait_ms=2.5, decode_max_running=128,
                       image_keep_ratio=0.5, prefix_cache=False),
    "colocated": Candidate(0, 2, 3, encode_colocated=True, encode_max_batch=8, encode_max_wait_ms=1.5,
                           decode_max_running=96, fastkv=True),
}


def _expected(c: Candidate) -> dict[str, dict[type, dict]]:
    """Per Deployment: the configs its flags build (the stage's own first) and fields they must hold."""
    encode = {EncodeConfig: {"max_batch_size": c.encode_max_batch, "max_batch_wait_ms": c.encode_max_wait_ms}}
    expected = {
        "prefill": {PrefillConfig: {"prefix_cache": c.prefix_cache, "fastkv": c.fastkv,
                                    "with_encode": c.encode_colocated}},
        "decode": {DecodeConfig: {"max_running": c.decode_max_running}},
        "router": {RouterConfig: {"image_keep_ratio": c.image_keep_ratio, "encode_colocated": c.encode_colocated,
                                  "encode": () if c.encode_colocated else ("k8s://llm/epd-epdserve-encode:grpc",)}},
    }
    if c.encode_colocated:
        expected["prefill"] |= encode  # prefill --with-encode takes the encode flags
    else:
        expected["encode"] = encode
    return expected


def _layered(base: dict, overlay: dict) -> dict:
    """Helm's -f layering: maps merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _layered(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


@pytest.mark.parametrize("candidate", CANDIDATES.values(), ids=CANDIDATES)
@pytest.mark.parametrize("base", [None, "cpu-tiny"])
def test_tuner_values_render_with_the_chart(base, candidate):
    chart = helm.Chart.load(CHART)
    overlay = yaml.safe_load(helm_values(candidate, gpus_per_replica=(1, 1, 2), header="generated\nby a test"))
    values = _layered({} if base is None else yaml.safe_load((CHART / "examples" / f"{base}.yaml").read_text()),
                      overlay)
    chart.validate_schema(_layered(yaml.safe_load((CHART / "values.yaml").read_text()), values))
    rendered = chart.render(values, name="epd", namespace="llm")
    docs = [d for name, text in rendered.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if doc["kind"] not in ("ServiceMonitor", "ScaledObject"):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}
    expected = _expected(candidate)
    assert set(deployments) == set(expected)
    replicas = {stage: d["spec"]["replicas"] for stage, d in deployments.items() if stage != "router"}
    assert replicas == {stage: getattr(candidate, f"{stage}_replicas") for stage in replicas}
    for stage, configs in expected.items():
        container = deployments[stage]["spec"]["template"]["spec"]["containers"][0]
        if stage == "decode" and base is None:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        argv = [a.replace("$(POD_IP)", "10.0.0.7") for a in container["args"][2:]]
        own, *also = configs
        parsed = service_arg_parser(stage, own, with_cache=stage != "router", also=tuple(also)).parse_args(argv)
        for config, fields in configs.items():
            settings = config_from_args(config, parsed)
            assert {k: getattr(settings, k) for k in fields} == fields, (stage, config.__name__)
