"""Router placement on synthetic load reports: prefill by predicted finish time (reported queue,
this router's own outstanding work, fitted rate and overhead), decode by batch headroom among
replicas whose free KV fits, images spread by predicted finish time, E -> PD only where allowed,
and the service-time model behind the reports."""

from __future__ import annotations

import pytest

from epdserve.v1 import load_pb2
from services.load import ServiceTimeModel
from services.router.placement import (
    CostDefaults,
    backlog_s,
    choose_decode,
    choose_prefill,
    finish_time_s,
    local_prefill_allowed,
    local_prefill_time_s,
    shard_images,
)
from services.router.pools import Replica

pytestmark = pytest.mark.unit
DEFAULTS = CostDefaults(prefill_tokens_per_s=1000.0, encode_images_per_s=10.0, decode_step_s=0.02)


def _replica(index: int, **load) -> Replica:
    return Replica(index, f"127.0.0.1:{9000 + index}", None, None,
                   load=load_pb2.LoadReport(**load) if load else None)


def test_prefill_goes_where_the_prompt_finishes_first():
    busy_fast = _replica(0, queued_work=4000, work_per_s=10000.0)  # 0.4 s of queue, then fast
    idle_slow = _replica(1, queued_work=0, work_per_s=2000.0)      # no queue, slow
    choice = choose_prefill([busy_fast, idle_slow], 2000, DEFAULTS)  # 0.6 s vs 1.0 s
    assert choice.replica is busy_fast and choice.predicted_s == pytest.approx(0.6)
    choice = choose_prefill([busy_fast, idle_slow], 100, DEFAULTS)   # 0.41 s vs 0.05 s
    assert choice.replica is idle_slow and choice.predicted_s == pytest.approx(0.05)


def test_prefill_avoids_a_replica_whose_pool_has_no_room_for_the_prompts_kv():
    """A prompt whose KV does not fit a prefill replica's pool waits there for decode to take
    earlier KV; while another replica has room, it goes there instead (all replicas stay candidates
    when none has: it waits wherever it finishes first)."""
    full = _replica(0, work_per_s=10000.0, kv_pool_room_bytes=1000, kv_bytes_per_token=10)     # 100 tokens
    roomy = _replica(1, work_per_s=2000.0, kv_pool_room_bytes=100_000, kv_bytes_per_token=10)  # slower
    assert choose_prefill([full, roomy], 100, DEFAULTS).replica is full      # fits both: the faster
    assert choose_prefill([full, roomy], 500, DEFAULTS).replica is roomy     # fits only the slower
    assert choose_prefill([full, roomy], 50_000, DEFAULTS).replica is full   # fits neither: the faster
    unreported = _replica(2, work_per_s=10000.0)                              # an older replica: no filter
    assert choose_prefill([unreported, roomy], 500, DEFAULTS).replica is unreported


def test_colocated_encode_work_ahead_moves_the_prefill_choice():
    """E+P colocated: a replica's model thread also runs the encode work queued on it (and this
    request's images, when it would encode them), so an idle prefill queue is not enough."""
    a, b = _replica(0, work_per_s=1000.0), _replica(1, work_per_s=1000.0, queued_work=100, queued_requests=1)
    assert choose_prefill([a, b], 100, DEFAULTS).replica is a
    encoding = _replica(10, queued_work=4, queued_requests=2, work_per_s=10.0, overhead_ms=10.0)
    ahead = {0: backlog_s(encoding, DEFAULTS.encode_images_per_s), 1: 0.0}
    assert ahead[0] == pytest.approx(0.4 + 0.02)
    choice = choose_prefill([a, b], 100, DEFAULTS, ahead_s=ahead)
    assert choice.replica is b and choice.predicted_s == pytest.approx(0.2)
    assert choose_prefill([a, b], 100, DEFAULTS, ahead_s={0: 0.05}).predicted_s == pytest.approx(0.15)


def test_backlog_is_zero_when_nothing_is_queued():
    assert backlog_s(_replica(0, work_per_s=10.0, overhead_ms=30.0), 1.0) == 0.0
    assert backlog_s(_replica(1), 1.0) == 0.0
    idle = _replica(2)
    idle.outstanding, idle.outstanding_work = 1, 3
    assert backlog_s(idle, 10.0) == pytest.approx(0.3)   # defaults until the replica measured a rate


def test_the_routers_own_outstanding_work_counts_between_reports():
    a, b = _replica(0, work_per_s=1000.0), _replica(1, work_per_s=1000.0)
    a.outstanding_work, a.outstanding = 500, 1
    assert choose_prefill([a, b], 100, DEFAULTS).replica is b
    assert finish_time_s(a, 100, 1.0) == pytest.approx(0.6)


def test_per_request_overhead_is_paid_for_every_request_in_front():
    r = _replica(0, queued_requests=2, running_requests=1, queued_work=0, work_per_s=1000.0, overhead_ms=50.0)
    assert finish_time_s(r, 100, 1.0) == pytest.approx(0.1 + 0.05 * 4)


def test_unmeasured_replicas_fall_back_to_least_outstanding():
    a, b = _replica(0), _replica(1)
    a.outstanding_work = 10
    assert choose_prefill([a, b], 100, DEFAULTS).replica is b
    assert choose_prefill([b, a], 100, DEFAULTS).predicted_s == pytest.approx(0.1)


def test_decode_prefers_headroom_among_replicas_whose_kv_fits():
    full_kv = _replica(0, running_requests=1, max_running=8, free_kv_blocks=2, total_kv_blocks=100, kv_block_tokens=16)
    busy = _replica(1, running_requests=6, max_running=8, free_kv_blocks=90, total_kv_blocks=100, kv_block_tokens=16,
                    step_ms=12.0)
    assert choose_decode([full_kv, busy], 200, DEFAULTS).replica is busy  # 32 free rows < 200
    assert choose_decode([full_kv, busy], 200, DEFAULTS).predicted_s == pytest.approx(0.012)
    assert choose_decode([full_kv, busy], 20, DEFAULTS).replica is full_kv  # fits, and emptier
    assert choose_decode([full_kv], 10_000, DEFAULTS).replica is full_kv  # nothing fits: it waits there


def test_images_are_spread_by_predicted_finish_time():
    fast, slow = _replica(0, work_per_s=30.0), _replica(1, work_per_s=10.0)
    shards = shard_images([fast, slow], 8, DEFAULTS)
    assert sorted(p for ps in shards.values() for p in ps) == list(range(8))
    assert len(shards[0]) == 6 and len(shards[1]) == 2
    assert shard_images([_replica(0), _replica(1)], 4, DEFAULTS) == {0: [0, 2], 1: [1, 3]}


def test_a_replica_that_has_not_measured_its_rate_is_taken_to_run_at_its_peers_rate():
    """The default rates are pessimistic guesses; a replica judged by one next to a measured peer
    would look slow, get no work while the peer keeps up, and never measure its own rate."""
    measured = _replica(0, work_per_s=300.0)        # 300 images/s (default: 10)
    fresh = _replica(1)                              # no report yet
    assert shard_images([measured, fresh], 4, DEFAULTS) == {0: [0, 2], 1: [1, 3]}
    measured = _replica(0, work_per_s=50_000.0)     # 50k tokens/s (default: 1k)
    assert choose_prefill([measured, fresh], 500, DEFAULTS).predicted_s == pytest.approx(0.01)
    busy = _replica(0, work_per_s=50_000.0, queued_work=1000, queued_requests=1)
    assert choose_prefill([busy, fresh], 500, DEFAULTS).replica is fresh   # 0.03 s there vs 0.01 s here
    assert shard_images([_replica(0), _replica(1)], 2, DEFAULTS) == {0: [0], 1: [1]}   # nobody measured: the default


def test_local_prefill_is_allowed_only_within_both_limits():
    decode = _replica(0, local_prefill_max_tokens=256)
    assert local_prefill_allowed(decode, 100, 512)
    assert not local_prefill_allowed(decode, 300, 512)       # the replica's limit
    assert not local_prefill_allowed(decode, 100, 64)        # the router's limit
    assert not local_prefill_allowed(_replica(1, local_prefill_max_tokens=0), 10, 512)
    assert not local_prefill_allowed(_replica(2), 10, 512)   # no report yet


def test_local_prefill_waits_for_the_step_in_progress_only_while_decoding():
    idle, decoding = _replica(0), _replica(1, running_requests=3)
    assert local_prefill_time_s(idle, 100, 1000.0, 0.02) == pytest.approx(0.1)
    assert local_prefill_time_s(decoding, 100, 1000.0, 0.02) == pytest.approx(0.12)


def test_service_time_model_fits_overhead_and_rate():
    model = ServiceTimeModel()
    assert model.fit() == (0.0, 0.0)
    for work in (100, 200, 400, 800):
        model.add(work, 0.05 + work / 2000.0)
    rate, overhead = model.fit()
    assert rate == pytest.approx(2000.0) and overhead == pytest.approx(0.05)
    single = ServiceTimeModel()
    single.add(100, 0.2)
    assert single.fit() == (pytest.approx(500.0), 0.0)


def test_work_started_on_one_thread_ends_on_another_and_only_completed_work_is_fitted():
    import threading

    from services.load import LoadTracker

    tracker = LoadTracker("encode", "e0")
    completed, failed = tracker.start_running(32), tracker.start_running(8)
    assert tracker.counts() == (0, 2)
    ender = threading.Thread(target=completed.end, args=(True,))
    ender.start()
    ender.join()
    failed.end(False)
    assert tracker.counts() == (0, 0)
    assert tracker.model.fit()[0] > 0 and len(tracker.model._samples) == 1


def test_pipelined_work_is_fitted_from_when_the_previous_piece_finished():
    import time

    from services.load import LoadTracker

    tracker = LoadTracker("encode", "e0")
    first, second = tracker.start_running(32), tracker.start_running(32)
    time.sleep(0.05)
    first_done = first.end(True)
    time.sleep(0.01)
    second.end(True, busy_from=first_done)
    samples = [seconds for _, seconds in tracker.model._samples]
    assert samples[0] >= 0.05 and 0.01 <= samples[1] < 0.05
