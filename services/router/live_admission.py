"""Early rejection in the live router: the admission policy (`admission.py`, pure) fed with states
built from the replicas' load reports and the router's own record of what it has in flight.

Invariant: every request the router has admitted and not finished is in `inflight` exactly once,
counted against the decode replica that serves it (or, until that is chosen, the one placement would
pick at admission), as running once decode has started and as incoming (joining at its predicted
prefill end) before; so a decision sees the decode load its own earlier admissions will create.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Iterator

from epdserve.config import RouterConfig
from epdserve.errors import ResourceExhaustedError
from services.load import ServiceTimeModel
from services.router.admission import (
    SLO,
    AdmissionConfig,
    AdmissionRequest,
    DecodeModel,
    DecodeState,
    IncomingSeq,
    OutputLengthModel,
    PredictiveAdmission,
    PrefillModel,
    PrefillState,
    RunningSeq,
)
from services.router.placement import CostDefaults, queued, service_rate
from services.router.pools import Replica, ReplicaPool

HISTORY = 512           # completed output lengths the length model looks at
DEFAULT_CAPACITY = 64   # decode batch limit before a replica reported its own


@dataclasses.dataclass
class Admitted:
    """One admitted request, as the admission state tracks it."""

    prompt_tokens: int
    max_tokens: int
    decode_index: int
    join_at_s: float        # predicted end of prefill (monotonic clock)
    emitted: int = 0        # tokens produced so far
    decoding: bool = False  # in a decode replica's batch


class LiveAdmission:
    """Owns the policy, the in-flight record and the learned models; all methods run on the event
    loop. `admit` raises ResourceExhaustedError (with retry_after_s) when the policy rejects."""

    def __init__(self, config: RouterConfig, prefill: ReplicaPool, decode: ReplicaPool, defaults: CostDefaults) -> None:
        self.policy = PredictiveAdmission(AdmissionConfig(SLO(config.slo_ttft_s, config.slo_tpot_s)))
        self.prefill, self.decode, self.defaults = prefill, decode, defaults
        self.inflight: dict[int, Admitted] = {}
        self.lengths: collections.deque[int] = collections.deque(maxlen=HISTORY)
        self._step_models: collections.defaultdict[int, ServiceTimeModel] = collections.defaultdict(ServiceTimeModel)
        self._seen_reports: dict[int, float] = {}  # replica index -> reported_at of the last report learned
        self._ids = itertools.count()

    def admit(self, prompt_tokens: int, uncached_tokens: int, max_tokens: int) -> int:
        """Decide for a request arriving now; returns its admission id (pass it to `started`,
        `emitted`, `finished`). Raises ResourceExhaustedError when it is rejected."""
        now = time.monotonic()
        self._learn_step_times()
        lengths = self._length_model()
        expected = min(max_tokens, lengths.mean()) if lengths is not None else max_tokens
        request = AdmissionRequest(prompt_tokens, min(uncached_tokens, prompt_tokens), expected)
        prefills, decodes = self.prefill.healthy(), self.decode.healthy()
        decision = self.policy.decide(request, [self._prefill_state(r) for r in prefills],
                                      [self._decode_state(r, lengths, now) for r in decodes], now)
        if not decision.admit:
            raise ResourceExhaustedError(f"rejected at arrival to keep the latency SLO: {decision.reason}; "
                                         f"retry after {decision.retry_after_s:.1f} s",
                                         retry_after_s=decision.retry_after_s)
        admission_id = next(self._ids)
        decode_index = decodes[decision.decode_index].index
        self.inflight[admission_id] = Admitted(prompt_tokens, max_tokens, decode_index,
                                               now + decision.predicted_ttft_s)
        return admission_id

    def started(self, admission_id: int, decode: Replica) -> None:
        record = self.inflight.get(admission_id)
        if record is not None:
            record.decode_index, record.decoding = decode.index, True

    def emitted(self, admission_id: int, tokens: int) -> None:
        record = self.inflight.get(admission_id)
        if record is not None:
            record.emitted += tokens

    def finished(self, admission_id: int, completed: bool) -> None:
        """The request ended; `completed` (not failed or cancelled) adds its length to the history."""
        record = self.inflight.pop(admission_id, None)
        if record is not None and completed and record.emitted > 0:
            self.lengths.append(record.emitted)

    # ---- states ------------------------------------------------------------------------------------
    def _length_model(self) -> OutputLengthModel | None:
        still = [r.emitted for r in self.inflight.values() if r.decoding]
        if not self.lengths and not still:
            return None
        return OutputLengthModel.from_observations(list(self.lengths), still)

    def _prefill_state(self, replica: Replica) -> PrefillState:
        rate = service_rate(replica, self.defaults.prefill_tokens_per_s)
        overhead = replica.load.overhead_ms / 1000.0 if replica.load is not None else 0.0
        work, requests = queued(replica)
        return PrefillState(PrefillModel(overhead, 1.0 / rate), requests, work)

    def _decode_state(self, replica: Replica, lengths: OutputLengthModel | None, now: float) -> DecodeState:
        running, incoming = [], []
        for record in self._records_for(replica):
            remaining = self._remaining(record, lengths)
            context = record.prompt_tokens + record.emitted
            if record.decoding:
                running.append(RunningSeq(remaining, context))
            else:
                incoming.append(IncomingSeq(max(record.join_at_s, now), remaining, context))
        capacity = replica.load.max_running if replica.load is not None and replica.load.max_running else \
            DEFAULT_CAPACITY
        return DecodeState(self._decode_model(replica), capacity, tuple(running), tuple(incoming))

    def _records_for(self, replica: Replica) -> Iterator[Admitted]:
        return (r for r in self.inflight.values() if r.decode_index == replica.index)

    @staticmethod
    def _remaining(record: Admitted, lengths: OutputLengthModel | None) -> tuple[float, ...]:
        cap = max(record.max_tokens - record.emitted, 1)
        if lengths is None:
            return (float(cap),)
        return tuple(min(value, cap) for value in lengths.remaining_quantiles(record.emitted))

    def _decode_model(self, replica: Replica) -> DecodeModel:
        rate, overhead = self._step_models[replica.index].fit()
        if rate <= 0:
            step = replica.load.step_ms / 1000.0 if replica.load is not None and replica.load.step_ms > 0 else \
                self.defaults.decode_step_s
            return DecodeModel(step, 0.0)
        return DecodeModel(overhead, 1.0 / rate)

    def _learn_step_times(self) -> None:
        """Each new decode load report with a measured step adds (batch, step seconds) to that
        replica's step-time fit."""
        for replica in self.decode.replicas:
            load = replica.load
            if load is None or replica.reported_at <= self._seen_reports.get(replica.index, 0.0):
                continue
            self._seen_reports[replica.index] = replica.reported_at
            if load.step_ms > 0 and load.running_requests > 0:
                self._step_models[replica.index].add(load.running_requests, load.step_ms / 1000.0)
