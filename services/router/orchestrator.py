"""Drives one request through Encode -> Prefill -> Decode and turns tokens into streamed text.

Invariant: every KV the prefill stage publishes for a request is handed to exactly one decode
call (which releases it), including when generation ends at the first token (a decode call with
max_new_tokens=0 releases it) — or, if the request dies in between, it expires by TTL.
A vanished cache entry between stages (FAILED_PRECONDITION) re-runs the stages before it, at most
`stage_retries` times: a lost embedding re-runs encode without the cache lookup; a prompt KV lost
before decode read it (its prefill owner died) re-runs prefill, and decode continues from the first
token already sent (the KV covers the prompt only, so it does not depend on that token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from epdserve import tracing
from epdserve.config import RouterConfig
from epdserve.errors import DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, UnavailableError
from epdserve.models.prompt import PromptBuilder, PromptTokens
from epdserve.models.spec import kept_tokens
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.errors import from_rpc_error
from epdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.router.discovery import EndpointSliceWatcher, ServiceRef, is_discovered
from services.router.live_admission import LiveAdmission
from services.router.placement import (
    CostDefaults,
    backlog_s,
    choose_decode,
    choose_prefill,
    encode_rate,
    finish_time_s,
    local_prefill_allowed,
    local_prefill_time_s,
    prefill_rate,
    shard_images,
)
from services.router.pools import Replica, ReplicaPool
from services.router.prefix_view import CachedPrefix, PrefixView, prefix_settings
from services.router.requests import GenerationRequest, check_context
from services.router.text import IncrementalDetokenizer, StopStringMatcher
from services.wire import sampling_to_proto


@dataclasses.dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]


class Orchestrator:
    def __init__(self, config: RouterConfig, prompts: PromptBuilder, defaults: CostDefaults | None = None, *,
                 credentials: Credentials = NO_CREDENTIALS) -> None:
        self.config, self.prompts = config, prompts
        self.credentials = credentials  # what every call to a stage replica presents
        self.defaults = defaults or CostDefaults(kv_transfer_bytes_per_s=config.kv_transfer_gb_s * 1e9)
        self.prefixes = PrefixView(config.cache_redis_url, config.cache_namespace) if config.cache_redis_url else None
        self.max_context = prompts.spec.decoder.max_context
        self.stop_token_ids = prompts.eos_token_ids()
        self._watchers: list[EndpointSliceWatcher] = []
        self.encode = self._pool("encode", encode_pb2, "EncodeService", encode_pb2_grpc.EncodeServiceStub)
        self.prefill = self._pool("prefill", prefill_pb2, "PrefillService", prefill_pb2_grpc.PrefillServiceStub)
        self.decode = self._pool("decode", decode_pb2, "DecodeService", decode_pb2_grpc.DecodeServiceStub)
        early_rejection = config.slo_ttft_s > 0 or config.slo_tpot_s > 0
        self.admission = LiveAdmission(config, self.prefill, self.decode, self.defaults) if early_rejection else None
        # observed TTFT minus the replica-level prediction, per first-token path (moving averages):
        # what the load reports cannot see (RPCs, embedding and prefix fetches, KV hand-off)
        self.ttft_residual_s = {"prefill": 0.0, "local": 0.0}
        self._finishing: set[asyncio.Task] = set()  # decode streams whose final response has arrived

    def _pool(self, stage: str, module, service: str, stub_cls) -> ReplicaPool:
        """A static pool, or an empty one that a Kubernetes EndpointSlice watcher fills (k8s://).
        E+P colocated: the encode pool is the prefill replicas' EncodeService."""
        addresses = self.config.encode_addresses() if stage == "encode" else getattr(self.config, stage)
        discovered = is_discovered(addresses)
        pool = ReplicaPool(stage, _service_name(module, service), () if discovered else addresses, stub_cls,
                           interval_s=self.config.health_interval_s, credentials=self.credentials)
        if discovered:
            self._watchers.append(EndpointSliceWatcher(ServiceRef.parse(addresses[0]), pool.set_addresses))
        return pool

    async def start(self) -> None:
        """Start watching the replicas (health and load, and EndpointSlices for k8s:// pools); call
        once inside the serving event loop. Raises FailedPreconditionError when a k8s:// pool needs
        the `kubernetes` client and it is not installed."""
        await asyncio.gather(self.encode.start(), self.prefill.start(), self.decode.start())
        for watcher in self._watchers:
            try:
                watcher.start()
            except ImportError:
                raise FailedPreconditionError("k8s:// addresses need the kubernetes client: "
                                              "pip install 'epdserve[kubernetes]'") from None

    def tokenize(self, req: GenerationRequest) -> PromptTokens:
        per_image = kept_tokens(self.prompts.tokens_per_image, req.image_keep_ratio)
        prompt = self.prompts.build(req.prompt, len(req.images), req.raw, per_image)
        check_context(len(prompt.token_ids), prompt.image_tokens, req.max_tokens, self.max_context)
        return prompt

    async def generate(self, req: GenerationRequest, prompt: PromptTokens, deadline: float,
                       decode_replica: Replica | None = None) -> AsyncIterator:
        """Yield TextChunk events, then one Finished. `decode_replica`: decode there (E -> P -> D),
        as an offline batch plan says; None: placement chooses."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        run = _Run(_TextStream(self.prompts.tokenizer, prompt.token_ids, req.stop), [])
        if self.admission is not None:  # early rejection: raises RESOURCE_EXHAUSTED before any stage runs
            tokens = len(prompt.token_ids)
            with tracing.span("router.admission"):
                run.admission = self.admission.admit(tokens, tokens, req.max_tokens)
        try:
            async for event in self._generate(req, prompt, deadline, timings, run, start, decode_replica):
                yield event
            run.completed = True
        finally:
            if run.admission is not None:
                self.admission.finished(run.admission, run.completed)

    async def _generate(self, req, prompt, deadline, timings, run: "_Run", start: float, decode_replica):
        started = await self._start(req, prompt, deadline, timings, local=decode_replica is None,
                                    decode_replica=decode_replica)
        for attempt in itertools.count():
            if started.local is None:
                break
            # E -> PD: the decode replica prefills and streams every token
            reserve = len(prompt.token_ids) + req.max_tokens
            try:
                async for event in self._decode(run, started.local, reserve, started.decode, deadline, timings, start):
                    yield event
                break
            except FailedPreconditionError:  # an embedding vanished before decode read it: re-encode
                if run.tokens or not req.images or attempt >= self.config.stage_retries:
                    raise
            # (then prefill, or, aggregated, E -> PD again)
            started = await self._start(req, prompt, deadline, timings, skip_lookup=True, local=False,
                                        decode_replica=decode_replica)
        if started.prefill is not None:  # E -> P -> D: the first token comes from prefill
            async for event in self._after_prefill(run, req, prompt, started.prefill, deadline, timings, start,
                                                   decode_replica):
                yield event
        tail = "" if run.stream.stopped else run.stream.flush()
        if tail:
            yield TextChunk(tail, ())
        timings["total_ms"] = (time.perf_counter() - start) * 1000.0
        self._learn_ttft(timings)
        _derived_timings(timings, len(run.tokens))
        yield Finished(run.finish, len(prompt.token_ids), prompt.image_tokens, len(run.tokens), timings)

    async def _after_prefill(self, run: "_Run", req, prompt, prefill, deadline, timings, start: float,
                             decode_replica=None):
        timings["ttft_ms"] = (time.perf_counter() - start) * 1000.0
        self._emitted(run, 1)
        first_token = prefill.first_token_id
        run.tokens.append(first_token)
        chunk = run.stream.push(first_token)
        yield TextChunk(chunk.text, (first_token,))
        run.finish = "stop" if chunk.stopped else self._finish_reason(req, first_token, 1)
        if run.finish:
            await self._release_kv(prefill.kv, deadline)
            return
        for attempt in itertools.count():
            request = self._decode_request(req, prefill.kv, first_token, req.max_tokens - 1)
            try:
                async for event in self._decode(run, request, prefill.kv.length + req.max_tokens, decode_replica,
                                                deadline, timings):
                    yield event
                return
            except FailedPreconditionError:  # the prompt's KV vanished before decode read it
                if len(run.tokens) > 1 or attempt >= self.config.stage_retries:
                    raise
            timings["kv_lost_reprefills"] = attempt + 1.0
            prefill = (await self._start(req, prompt, deadline, timings, local=False)).prefill

    def _finish_reason(self, req: GenerationRequest, token: int, produced: int) -> str:
        if token in self.stop_token_ids and not req.ignore_eos:
            return "stop"
        return "length" if produced >= req.max_tokens else ""

    async def _start(self, req, prompt, deadline, timings, *, skip_lookup: bool = False,
                     local: bool = True, decode_replica: Replica | None = None) -> "_Started":
        """Encode, then either prefill (E -> P -> D) or hand the prompt to a decode replica (E -> PD),
        whichever the cost model predicts reaches the first token sooner (`local` False: always
        prefill). A vanished cache entry between stages re-runs from encode without the cache
        lookup."""
        if self.config.aggregated:
            return await self._start_aggregated(req, prompt, deadline, timings, skip_lookup, decode_replica)
        for attempt in itertools.count():
            try:
                home = self._colocated_home(req, prompt)
                refs = await self._encode(req, deadline, timings, skip_lookup, home)
                with tracing.span("router.placement") as placement:
                    cached = await self._cached_prefixes(req, prompt, refs)
                    local = local and self._local_prefill_replica(req, prompt, timings, cached, home)
                    placement.set_attribute("epdserve.local_prefill", bool(local))
                timings["local_prefill"] = 1.0 if local else 0.0
                if local:
                    return _Started(None, self._local_request(req, prompt, refs), local)
                return _Started(await self._prefill(req, prompt, refs, deadline, timings, cached, home), None, None)
            except FailedPreconditionError:
                if attempt >= self.config.stage_retries or not req.images:
                    raise
                skip_lookup = True  # an embedding vanished between encode and prefill: re-encode
        raise AssertionError("unreachable")

    async def _start_aggregated(self, req, prompt, deadline, timings, skip_lookup: bool,
                                decode_replica: Replica | None = None) -> "_Started":
        """Aggregated (encode colocated, no prefill replicas): one decode replica encodes the images
        and prefills the prompt itself (E -> PD), the one with the most headroom that prefills
        prompts this long."""
        tokens = len(prompt.token_ids)
        able = [r for r in self.decode.healthy() if local_prefill_allowed(r, tokens, self.max_context)]
        if not able:
            if any(local_prefill_allowed(r, tokens, self.max_context) for r in self.decode.replicas):
                raise UnavailableError("no healthy decode replica that prefills a prompt this long; retry")
            longest = max((r.load.local_prefill_max_tokens for r in self.decode.replicas if r.load is not None),
                          default=0)
            raise InvalidArgumentError(f"prompt: {tokens} tokens; with no prefill replicas the decode replicas "
                                       f"prefill every prompt, and they take at most {longest} "
                                       "(--local-prefill-max-tokens)")
        planned = [r for r in able if r is decode_replica]  # an offline batch plan's choice
        home = choose_decode(planned or able, tokens + req.max_tokens, self.defaults).replica
        timings["local_prefill"] = 1.0
        for attempt in itertools.count():
            try:
                refs = await self._encode(req, deadline, timings, skip_lookup, home)
                return _Started(None, self._local_request(req, prompt, refs), home)
            except FailedPreconditionError:
                if attempt >= self.config.stage_retries or not req.images:
                    raise
                skip_lookup = True
        raise AssertionError("unreachable")

    async def _cached_prefixes(self, req, prompt, refs) -> dict[int, CachedPrefix]:
        """Per healthy prefill replica, the prompt's prefix it would load from the cache (one index
        lookup per distinct key setting); empty when the router is not cache-aware."""
        if self.prefixes is None or req.fastkv is not None:
            return {}
        by_settings: dict[tuple, list[int]] = {}
        for replica in self.prefill.healthy():
            settings = prefix_settings(replica.load)
            if settings is not None:
                by_settings.setdefault(settings, []).append(replica.index)
        cached: dict[int, CachedPrefix] = {}
        for settings, indices in by_settings.items():
            hit = await self.prefixes.cached(settings, prompt.token_ids, self.prompts.spec.image_token_id, refs,
                                             req.cache_salt)
            cached.update(dict.fromkeys(indices, hit))
        return cached

    def _colocated_home(self, req, prompt) -> Replica | None:
        """E+P colocated, a request with images: the prefill replica that encodes them and then
        prefills the prompt (both on its one model thread), the one predicted to finish both first.
        None otherwise (and when no replica has both stages healthy: images then go anywhere)."""
        if not self.config.encode_colocated or self.config.aggregated or not req.images:
            return None
        encoders = {r.address: r for r in self.encode.replicas if r.healthy}
        homes = [r for r in self.prefill.replicas if r.healthy and r.address in encoders]
        if not homes:
            return None
        rate = encode_rate(self.encode.replicas, self.defaults)
        ahead = {r.index: finish_time_s(encoders[r.address], len(req.images), rate) for r in homes}
        return choose_prefill(homes, len(prompt.token_ids), self.defaults, None, ahead).replica

    def _encode_backlog_s(self) -> dict[int, float] | None:
        """E+P colocated: per prefill replica, the encode work queued on its model thread."""
        if not self.config.encode_colocated:
            return None
        encoders = {r.address: r for r in self.encode.replicas}
        rate = encode_rate(self.encode.replicas, self.defaults)
        return {r.index: backlog_s(encoders[r.address], rate) for r in self.prefill.replicas if r.address in encoders}

    def _prefill_candidates(self, home: Replica | None, tried: Sequence[Replica] = ()) -> list[Replica]:
        """Where the prompt may prefill: its colocated home while that is healthy and untried,
        else every healthy replica not tried yet (UnavailableError when none is left)."""
        if home is not None and home.healthy and all(home is not r for r in tried):
            return [home]
        return self.prefill.healthy(exclude=tried)

    def _local_prefill_replica(self, req, prompt, timings, cached, home: Replica | None = None) -> Replica | None:
        """The decode replica to prefill this prompt itself, when E -> PD is predicted faster than
        the best prefill replica plus the KV hand-off; else None."""
        tokens = len(prompt.token_ids)
        if tokens > self.config.local_prefill_tokens or req.fastkv is not None:
            return None
        limit = self.config.local_prefill_tokens
        decodes = [r for r in self.decode.healthy() if local_prefill_allowed(r, tokens, limit)]
        if not decodes:
            return None
        decode = choose_decode(decodes, tokens + req.max_tokens, self.defaults)
        rate = prefill_rate(self.prefill.replicas, self.defaults)
        local_s = local_prefill_time_s(decode.replica, tokens, rate, decode.predicted_s)
        timings["predicted_local_prefill_ms"] = local_s * 1000.0
        try:
            remote_s = choose_prefill(self._prefill_candidates(home), tokens, self.defaults, cached,
                                      self._encode_backlog_s()).predicted_s
        except UnavailableError:  # no prefill replica left: E -> PD is the only way
            return decode.replica
        residual = self.ttft_residual_s
        # a tie goes to E -> PD: it moves no KV between replicas
        return decode.replica if local_s + residual["local"] <= remote_s + residual["prefill"] else None

    async def _encode(self, req, deadline, timings, skip_lookup: bool,
                      home: Replica | None = None) -> list[common_pb2.TensorRef]:
        """Encode the request's images; with several encode replicas the images are spread over
        them by predicted finish time (intra-request parallelism) and the embeddings come back in
        the original order; E+P colocated (`home`: the prefill replica chosen for it), all on that
        replica's EncodeService. A shard whose replica is unavailable is re-sent to another one."""
        if not req.images:
            return []
        twin = next((r for r in self.encode.replicas if home is not None and r.address == home.address), None)
        if twin is not None and twin.healthy:
            shards = {twin.index: list(range(len(req.images)))}
        else:
            shards = shard_images(self.encode.healthy(), len(req.images), self.defaults)
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(self._encode_shard(req, self.encode.get(index), positions, deadline,
                                                              skip_lookup) for index, positions in shards.items()))
        timings["encode_rpc_ms"] = (time.perf_counter() - t0) * 1000.0
        timings["encode_replicas"] = float(len(shards))
        refs: list = [None] * len(req.images)
        for positions, response in zip(shards.values(), responses):
            for position, image in zip(positions, response.images):
                refs[position] = image
            _merge(timings, "encode.", response.timings_ms, accumulate=True)
        timings["encode_cache_hits"] = float(sum(image.cache_hit for image in refs))
        return [image.embedding for image in refs]

    async def _encode_shard(self, req, replica: Replica, positions: list[int], deadline, skip_lookup: bool):
        request = encode_pb2.EncodeRequest(
            request_id=req.request_id,
            images=[common_pb2.ImageInput(data=req.images[i]) for i in positions],
            skip_cache_lookup=skip_lookup,
            cache_salt=req.cache_salt,
            keep_ratio=req.image_keep_ratio,
        )
        tried: list[Replica] = []
        while True:
            attributes = {"epdserve.replica": replica.address, "epdserve.images": len(positions)}
            with self.encode.track(replica, len(positions)), tracing.span("router.encode", attributes):
                try:
                    call = replica.stub.Encode(request, timeout=_remaining(deadline), metadata=tracing.grpc_metadata())
                    return await _call("encode", call)
                except UnavailableError as exc:
                    self.encode.mark_down(replica, exc.message)
            tried.append(replica)
            replica = min(self.encode.healthy(exclude=tried), key=lambda r: r.outstanding_work)

    async def _prefill(self, req, prompt, refs, deadline, timings, cached,
                       home: Replica | None = None) -> prefill_pb2.PrefillResponse:
        """Prefill on the replica predicted to finish first (E+P colocated: on `home`, which
        encoded the images); an unavailable replica is removed and the next best one tried (before
        any token exists, so nothing is lost)."""
        request = prefill_pb2.PrefillRequest(
            request_id=req.request_id,
            token_ids=prompt.token_ids,
            image_embeddings=refs,
            sampling=sampling_to_proto(req.sampling),
            cache_salt=req.cache_salt,
            fastkv=req.fastkv,
        )
        tokens, tried = len(prompt.token_ids), []
        t0 = time.perf_counter()
        while True:
            choice = choose_prefill(self._prefill_candidates(home, tried), tokens, self.defaults, cached,
                                    self._encode_backlog_s())
            attributes = {"epdserve.replica": choice.replica.address, "epdserve.prompt_tokens": tokens,
                          "epdserve.predicted_ms": choice.predicted_s * 1000.0}
            with self.prefill.track(choice.replica, tokens), tracing.span("router.prefill", attributes):
                try:
                    call = choice.replica.stub.Prefill(request, timeout=_remaining(deadline),
                                                       metadata=tracing.grpc_metadata())
                    response = await _call("prefill", call)
                    break
                except UnavailableError as exc:
                    self.prefill.mark_down(choice.replica, exc.message)
            tried.append(choice.replica)
        timings["prefill_rpc_ms"] = (time.perf_counter() - t0) * 1000.0
        timings["prefill_replica"] = float(choice.replica.index)
        timings["predicted_prefill_ms"] = choice.predicted_s * 1000.0
        timings["predicted_cached_tokens"] = float(choice.cached_tokens)
        _merge(timings, "prefill.", response.timings_ms)
        return response

    def _decode_request(self, req, kv: common_pb2.KVHandle, first_token_id: int,
                        max_new_tokens: int) -> decode_pb2.DecodeRequest:
        return decode_pb2.DecodeRequest(
            request_id=req.request_id,
            kv=kv,
            first_token_id=first_token_id,
            max_new_tokens=max_new_tokens,
            sampling=sampling_to_proto(req.sampling),
            stop_token_ids=self.stop_token_ids,
            ignore_eos=req.ignore_eos,
        )

    def _local_request(self, req, prompt, refs) -> decode_pb2.DecodeRequest:
        return decode_pb2.DecodeRequest(
            request_id=req.request_id,
            prompt=decode_pb2.LocalPrompt(token_ids=prompt.token_ids, image_embeddings=refs),
            max_new_tokens=req.max_tokens,
            sampling=sampling_to_proto(req.sampling),
            stop_token_ids=self.stop_token_ids,
            ignore_eos=req.ignore_eos,
        )

    async def _release_kv(self, kv: common_pb2.KVHandle, deadline: float) -> None:
        """Generation ended at the first token: a zero-token decode call releases the KV (already
        gone with its owner: nothing to release, the request still succeeded)."""
        request = decode_pb2.DecodeRequest(kv=kv, max_new_tokens=0, first_token_id=0)
        try:
            async for _ in self._decode_stream(request, 0, None, deadline):
                pass
        except FailedPreconditionError:
            pass

    async def _decode(self, run: "_Run", request, reserve: int, first_choice, deadline, timings, ttft_from=None):
        """Stream the decode replica's tokens as TextChunks; sets run.finish. With `ttft_from`
        (E -> PD) the first token's arrival sets timings["ttft_ms"]."""
        async for response in self._decode_stream(request, reserve, first_choice, deadline, run):
            self._emitted(run, len(response.token_ids))
            if ttft_from is not None and response.token_ids and "ttft_ms" not in timings:
                timings["ttft_ms"] = (time.perf_counter() - ttft_from) * 1000.0
            run.tokens.extend(response.token_ids)
            chunk = run.stream.push_many(response.token_ids)
            if response.token_ids:
                yield TextChunk(chunk.text, tuple(response.token_ids))
            if chunk.stopped or response.finish_reason:
                run.finish = "stop" if chunk.stopped else response.finish_reason
                _merge(timings, "decode.", response.timings_ms)
                return
        run.finish = "length"

    def _emitted(self, run: "_Run", tokens: int) -> None:
        if run.admission is not None and tokens:
            self.admission.emitted(run.admission, tokens)

    async def _decode_stream(self, request, reserve: int, first_choice: Replica | None, deadline,
                             run: "_Run | None" = None):
        """Decode responses from the replica with the most headroom (or `first_choice`). A replica
        that is unavailable before its first response is removed and the call re-sent to another
        (exact: nothing was produced there; the KV or prompt is still in the cache); after that,
        the stream ends with UnavailableError."""
        tried: list[Replica] = []
        replica = first_choice
        while True:
            if replica is None:
                replica = choose_decode(self._decode_candidates(request, tried), reserve, self.defaults).replica
            attributes = {"epdserve.replica": replica.address}  # a generator: the span is not made current
            with (self.decode.track(replica, len(request.prompt.token_ids)),
                  tracing.detached_span("router.decode", attributes) as span):
                if run is not None and run.admission is not None:
                    self.admission.started(run.admission, replica)
                call = replica.stub.Decode(request, timeout=_remaining(deadline), metadata=tracing.grpc_metadata(span))
                answered = finished = False
                try:
                    async for response in _stream("decode", call):
                        answered, finished = True, bool(response.finish_reason)
                        yield response
                    return
                except UnavailableError as exc:
                    if answered:
                        raise
                    self.decode.mark_down(replica, exc.message)
                finally:
                    self._end_call(call, finished)
            tried.append(replica)
            replica = None

    def _end_call(self, call, finished: bool) -> None:
        """A decode stream the router stops reading: cancel it, unless its final response came (the
        consumer stops there, before the status arrives). That one is left to end OK on its own, its
        status read in the background: a cancel, or dropping the call (grpc cancels calls it
        collects), could reach the replica first and count a completed request as cancelled."""
        if not finished:
            call.cancel()
            return
        if call.done():
            return
        task = asyncio.ensure_future(_status(call))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    def _decode_candidates(self, request: decode_pb2.DecodeRequest, tried: list[Replica]) -> list[Replica]:
        """Healthy decode replicas not tried yet; for a local prompt (E -> PD), only those that
        prefill prompts that long. Raises UnavailableError when none is left."""
        healthy = self.decode.healthy(exclude=tried)
        if not request.HasField("prompt"):
            return healthy
        tokens = len(request.prompt.token_ids)
        able = [r for r in healthy if r.load is not None and r.load.local_prefill_max_tokens >= tokens]
        if not able:
            raise UnavailableError("no healthy decode replica left that prefills this prompt")
        return able

    def _learn_ttft(self, timings: dict[str, float]) -> None:
        path = "local" if timings.get("local_prefill") else "prefill"
        predicted = timings.get(f"predicted_{'local_' if path == 'local' else ''}prefill_ms")
        if predicted is None or "ttft_ms" not in timings:
            return
        residual = (timings["ttft_ms"] - predicted) / 1000.0
        self.ttft_residual_s[path] = 0.8 * self.ttft_residual_s[path] + 0.2 * residual

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.stop()
        for task in self._finishing:
            task.cancel()
        await asyncio.gather(self.encode.close(), self.prefill.close(), self.decode.close())
        if self.prefixes is not None:
            await self.prefixes.close()


@dataclasses.dataclass(frozen=True)
class _Started:
    prefill: prefill_pb2.PrefillResponse | None  # E -> P -> D
    local: decode_pb2.DecodeRequest | None       # E -> PD: the prompt for the decode replica
    decode: Replica | None                        # ... and the replica chosen for it


@dataclasses.dataclass
class _Run:
    stream: "_TextStream"
    tokens: list[int]
    finish: str = ""
    admission: int | None = None  # the LiveAdmission id when early rejection is on
    completed: bool = False


class _TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStringMatcher(stops)
        self.stopped = False

    def push(self, token_id: int):
        return self.push_many([token_id])

    def push_many(self, token_ids) -> "_Chunk":
        text = "".join(self.detok.push(t) for t in token_ids)
        result = self.stops.push(text)
        self.stopped = self.stopped or result.stopped
        return _Chunk(result.text, result.stopped)

    def flush(self) -> str:
        result = self.stops.push(self.detok.flush())
        return result.text + ("" if result.stopped else self.stops.flush())


@dataclasses.dataclass(frozen=True)
class _Chunk:
    text: str
    stopped: bool


def _service_name(module, service: str) -> str:
    return module.DESCRIPTOR.services_by_name[service].full_name


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0.05:
        raise DeadlineExceededError("request deadline exceeded before the next stage")
    return remaining


async def _call(stage: str, call):
    try:
        return await call
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, peer=stage) from None


async def _status(call) -> None:
    try:
        await call.code()
    except (grpc.RpcError, asyncio.CancelledError):
        pass


async def _stream(stage: str, call):
    try:
        async for item in call:
            yield item
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, peer=stage) from None


def _merge(timings: dict[str, float], prefix: str, stage_timings, *, accumulate: bool = False) -> None:
    """Copy a stage's timings under `prefix`; `accumulate` sums counts over shards (and keeps the
    longest duration, since shards run in parallel)."""
    for name, value in stage_timings.items():
        key = prefix + name
        if accumulate and key in timings:
            combine = max if name.endswith("_ms") or name == "batch_size" else (lambda a, b: a + b)
            timings[key] = float(combine(timings[key], value))
        else:
            timings[key] = float(value)


def _derived_timings(timings: dict[str, float], completion_tokens: int) -> None:
    """KV hand-off = publish (prefill) + fetch (decode); TPOT = mean time per token after the first."""
    timings["kv_handoff_ms"] = timings.get("prefill.kv_publish_ms", 0.0) + timings.get("decode.kv_fetch_ms", 0.0)
    if completion_tokens > 1:
        timings["tpot_ms"] = (timings["total_ms"] - timings["ttft_ms"]) / (completion_tokens - 1)

