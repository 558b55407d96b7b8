"""Early rejection as the live router runs it: the policy fed from load reports and the router's own
in-flight record. Idle replicas admit; a TTFT or TPOT over its SLO rejects with RESOURCE_EXHAUSTED,
the SLO named and a bounded retry hint; requests the router admitted but that have not reached
decode yet count against the decode load this request will meet (Mooncake's prediction), which a
current-load view would miss; finished requests leave the record and teach the length model."""

from __future__ import annotations

import pytest

from epdserve.config import RouterConfig
from epdserve.errors import ResourceExhaustedError
from epdserve.v1 import load_pb2
from services.router.live_admission import LiveAdmission
from services.router.placement import CostDefaults
from services.router.pools import Replica

pytestmark = pytest.mark.unit
DEFAULTS = CostDefaults(prefill_tokens_per_s=10_000.0, decode_step_s=0.01)


class FakePool:
    def __init__(self, *loads: dict) -> None:
        self.replicas = [Replica(i, f"127.0.0.1:{i}", None, None, load=load_pb2.LoadReport(**load), reported_at=1.0)
                         for i, load in enumerate(loads)]

    def healthy(self, exclude=()):
        return [r for r in self.replicas if r.healthy and r not in exclude]


def _admission(ttft_s=0.0, tpot_s=0.0, prefill=None, decode=None) -> LiveAdmission:
    config = RouterConfig(encode=("e",), prefill=("p",), decode=("d",), slo_ttft_s=ttft_s, slo_tpot_s=tpot_s)
    prefill = prefill or FakePool(dict(work_per_s=10_000.0))
    decode = decode or FakePool(dict(max_running=8, step_ms=10.0))
    return LiveAdmission(config, prefill, decode, DEFAULTS)


def test_idle_replicas_admit_and_the_record_follows_the_request():
    admission = _admission(ttft_s=1.0, tpot_s=0.05)
    request = admission.admit(1000, 1000, 16)
    assert admission.inflight[request].decode_index == 0 and not admission.inflight[request].decoding
    admission.started(request, admission.decode.replicas[0])
    admission.emitted(request, 12)
    admission.finished(request, completed=True)
    assert not admission.inflight and list(admission.lengths) == [12]


def test_a_ttft_over_the_slo_is_rejected_with_the_slo_named_and_a_retry_hint():
    busy = FakePool(dict(work_per_s=1000.0, queued_work=5000, queued_requests=3))  # 5 s of backlog
    admission = _admission(ttft_s=2.0, prefill=busy)
    with pytest.raises(ResourceExhaustedError, match="predicted TTFT") as info:
        admission.admit(100, 100, 16)
    assert 0.5 <= info.value.retry_after_s <= 30.0
    assert not admission.inflight


def test_a_slow_decode_step_is_rejected_on_tpot():
    admission = _admission(tpot_s=0.02, decode=FakePool(dict(max_running=8, step_ms=50.0)))
    with pytest.raises(ResourceExhaustedError, match="predicted TPOT"):
        admission.admit(100, 100, 16)


def test_admitted_requests_still_in_prefill_count_against_the_decode_they_will_join():
    # a decode whose step grows with the batch: 10 ms + 10 ms per sequence (as its reports taught)
    admission = _admission(tpot_s=0.07)
    model = admission._step_models[0]
    for batch in (1, 2, 4):
        model.add(batch, 0.010 + 0.010 * batch)
    admitted = [admission.admit(100, 100, 64) for _ in range(5)]  # each adds ~10 ms once it joins
    assert len(admission.inflight) == len(admitted)
    assert admission.decode.replicas[0].load.running_requests == 0  # what a current-load view sees
    with pytest.raises(ResourceExhaustedError, match="predicted TPOT"):
        admission.admit(100, 100, 64)
    for request in admitted:
        admission.finished(request, completed=False)
    admission.admit(100, 100, 64)  # room again


def test_no_slo_means_no_check():
    admission = _admission(ttft_s=0.0, tpot_s=0.0, decode=FakePool(dict(max_running=8, step_ms=500.0)))
    admission.admit(10_000, 10_000, 16)
