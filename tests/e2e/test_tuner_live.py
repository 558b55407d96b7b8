"""The tuner against real processes: `tuner profile` sweeps a local deployment through its router,
`tuner optimize` searches on that profile, `tuner validate` replays a trace against the same
deployment and compares the prediction with what the client measured."""

from __future__ import annotations

import json
import math

import pytest

from epdserve.launcher import ClusterConfig, LocalCluster
from tuner import cli
from tuner.profile import Profile

pytestmark = pytest.mark.e2e
WORKLOAD = "requests=40,rate=4,text_median=120,text_max=400,output_median=12,output_max=32,sizes=224x224,prefix=0"


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    with LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu")) as cluster:
        yield cluster


def test_profile_optimize_validate_on_a_live_deployment(cluster, tmp_path, capsys):
    profile_path = tmp_path / "profile.json"
    assert cli.main(["profile", "--router", cluster.router_address, "--out", str(profile_path), "--repeats", "1",
                     "--idle-s", "0.02", "--shared-host-cores", "2", "--shared-host-processes", "4",
                     "--measured-on", "test"]) == 0
    profile = Profile.load(profile_path)
    assert profile.encode.tokens_per_image == 16 and profile.host_cores == 2
    assert 0.0 < profile.idle_cores_per_process < 0.5   # idle replicas and the router still poll and beat
    assert profile.decode.step_ms.samples >= 5 and profile.prefill.compute_ms.samples >= 5
    assert profile.decode.step_ms.predict(batch=8, context=2000) > profile.decode.step_ms.predict(batch=1, context=100)
    fastkv = profile.prefill.fastkv_compute_ms   # FastKV swept at the deployment's rates (tsp 0.2, retain 0.1)
    assert fastkv is not None and fastkv.samples >= 3 and 0 < profile.prefill.fastkv_kv_fraction < 0.5

    out = tmp_path / "tuned"
    assert cli.main(["optimize", "--slo", "ttft=2s", "--profile", str(profile_path), "--synthetic", WORKLOAD,
                     "--trials", "4", "--max-replicas", "1", "--no-progress", "--out", str(out)]) == 0
    code = cli.main(["validate", "--router", cluster.router_address, "--from", str(out), "--profile", str(profile_path),
                     "--synthetic", WORKLOAD])
    printed = capsys.readouterr().out
    assert code in (0, 3) and "candidate 1: " in printed
    report = json.loads((out / "validation.json").read_text())
    assert report["requests"] == 40 and report["failed"] == 0
    rows = {(r["metric"], r["statistic"]): r for r in report["comparison"]}
    for key in (("ttft", "p50"), ("tpot", "mean"), ("e2e", "p50")):
        row = rows[key]
        assert math.isfinite(row["predicted_ms"]) and math.isfinite(row["measured_ms"]) and row["measured_ms"] > 0
        message = f"{key}: predicted {row['predicted_ms']:.1f} ms, measured {row['measured_ms']:.1f} ms"
        assert abs(row["error"]) < 1.0, message
    assert report["verdict"] == "VERIFIED" or report["verdict"].startswith("UNVERIFIED: ")
    components = report["components"]   # each profile fit judged on the replay's own stage timings
    fitted = {"router", "encode tower", "prefill compute", "prefill call", "decode step", "decode join"}
    assert fitted <= set(components)
    assert all(0.1 < ratio < 10 for ratio in components.values()), components
    assert "live / profiled, per component" in printed


def test_profile_through_the_stage_endpoints_directly(cluster, tiny_checkpoint, tmp_path, capsys):
    """`tuner profile --endpoints`: no router of the deployment is used; a private one on loopback
    is started in front of the given stage replicas for the sweep and stopped after."""
    addresses = {name: child.address for name, child in cluster.children.items()}
    profile_path = tmp_path / "profile.json"
    argv = ["profile", "--endpoints", f"encode={addresses['encode']}", "--endpoints", f"prefill={addresses['prefill']}",
            "--endpoints", f"decode={addresses['decode']}", "--model", str(tiny_checkpoint),
            "--redis-url", cluster.redis_url, "--out", str(profile_path), "--repeats", "1", "--idle-s", "0.02",
            "--shared-host-cores", "2"]
    assert cli.main(argv) == 0
    profile = Profile.load(profile_path)
    assert profile.encode.tokens_per_image == 16
    assert "idle CPU of 4 service processes" in capsys.readouterr().out   # 3 endpoints + the private router
    assert profile.decode.step_ms.samples >= 5 and profile.prefill.compute_ms.samples >= 5
    assert profile.decode.step_ms.predict(batch=8, context=2000) > profile.decode.step_ms.predict(batch=1, context=100)


@pytest.mark.parametrize("endpoints, message", [
    (["encode=a:1", "prefill=b:2"], "no address for decode"),
    (["encode=a:1", "encode=a:2", "prefill=b:2", "decode=c:3"], "encode given twice"),
    (["router=a:1"], "expected STAGE=ADDR"),
])
def test_endpoints_are_checked_before_anything_starts(endpoints, message):
    with pytest.raises(SystemExit, match=message):
        cli.parse_endpoints(endpoints)
