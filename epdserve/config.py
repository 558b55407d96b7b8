"""Configuration: one frozen dataclass per concern; each component receives only its slice.

CLI flags are generated from these fields (`add_config_args` / `config_from_args`), so each
setting and its help text is written once. Contradictory settings are rejected with a clear
error, never silently rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, TypeVar

MiB = 1 << 20
GiB = 1 << 30


def setting(default: Any, help: str) -> Any:  # noqa: A002 - "help" matches argparse
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "bind address (internal services stay on loopback unless told otherwise)")
    port: int = setting(0, "TCP port; 0 picks a free port (reported in --ready-file)")
    advertise_host: str = setting("", "host name peers use to reach this server (default: the bind host)")
    ready_file: str = setting("", "once serving, write {'address': ..., 'pid': ...} as JSON to this file")
    drain_timeout_s: float = setting(10.0, "on SIGTERM, seconds in-flight RPCs get to finish")
    max_message_bytes: int = setting(64 * MiB, "largest gRPC message accepted or sent")
    max_concurrent_rpcs: int = setting(256, "RPCs beyond this are rejected with RESOURCE_EXHAUSTED")
    reflection: bool = setting(False, "enable gRPC server reflection (for grpcurl)")
    metrics_port: int = setting(-1, "serve Prometheus GET /metrics on this port; -1 = off, 0 = a free port "
                                    "(reported as metrics_address in --ready-file)")
    metrics_host: str = setting("127.0.0.1", "bind address of the metrics endpoint")
    health_port: int = setting(-1, "also serve grpc.health.v1 alone, in plaintext and without a token, on this port "
                                   "of --host (for probes that cannot do TLS, e.g. the kubelet's); -1 = off, 0 = a "
                                   "free port (reported as health_address in --ready-file)")
    engine_failures_fatal: int = setting(3, "after this many model calls in a row fail unexpectedly (not bad input), "
                                            "the replica reports NOT_SERVING, refuses work with UNAVAILABLE and "
                                            "exits 1 so its supervisor restarts it; 0 = never")
    inject_model_fault_after: int = setting(-1, "fault testing: every model call after the Nth raises, as a failed "
                                                "GPU would; -1 = off")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535] (got {self.port})")
        for name in ("metrics_port", "health_port"):
            if not -1 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be -1 (off) or in [0, 65535] (got {getattr(self, name)})")
        if self.engine_failures_fatal < 0:
            raise ValueError(f"engine_failures_fatal must be >= 0 (got {self.engine_failures_fatal})")
        if self.health_port > 0 and self.health_port == self.port:
            raise ValueError(f"health_port must differ from port (both {self.port})")


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    auth_token_file: str = setting("", "file holding the deployment's shared bearer token (default: "
                                       "$EPDSERVE_AUTH_TOKEN_FILE, else the token in $EPDSERVE_AUTH_TOKEN; none of "
                                       "them = no token): every RPC but health, the HTTP front door and the mmcache "
                                       "data channel then require it, and every call this process makes sends it")
    tls_cert: str = setting("", "PEM certificate (chain) this process presents as server and as client; with "
                                "--tls-key and --tls-ca: mutual TLS on every gRPC port and the data channel")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_ca: str = setting("", "PEM CA certificate(s): every peer, clients included, must present a certificate "
                              "signed by one of them")
    tls_server_name: str = setting("", "with TLS: the name servers' certificates are checked against instead of the "
                                       "host in their address (set it when peers are reached by pod IP)")

    def __post_init__(self) -> None:
        files = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(files) and not all(files):
            raise ValueError("tls_cert, tls_key and tls_ca go together: set all three or none")
        if self.tls_server_name and not self.tls_cert:
            raise ValueError("tls_server_name goes with tls_cert, tls_key and tls_ca")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


TRACE_EXPORTERS = ("none", "otlp", "file")


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    trace_exporter: str = setting("none", "OpenTelemetry tracing: none (off, costs nothing), otlp (to a collector) "
                                          "or file (spans as JSON lines); otlp needs pip install 'epdserve[otlp]'")
    trace_endpoint: str = setting("", "OTLP gRPC endpoint (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                                      "$OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317)")
    trace_file: str = setting("", "with --trace-exporter file: append finished spans to this file, one JSON "
                                  "object per line (processes may share it)")
    trace_sample_ratio: float = setting(1.0, "fraction of requests traced, decided at the router; stages follow "
                                             "their caller's decision")

    def __post_init__(self) -> None:
        if self.trace_exporter not in TRACE_EXPORTERS:
            raise ValueError(f"trace_exporter must be one of {', '.join(TRACE_EXPORTERS)} "
                             f"(got {self.trace_exporter!r})")
        if (self.trace_exporter == "file") != bool(self.trace_file):
            raise ValueError("trace_file goes with trace_exporter file, and file needs it")
        if self.trace_endpoint and self.trace_exporter != "otlp":
            raise ValueError("trace_endpoint goes with trace_exporter otlp")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio must be in [0, 1] (got {self.trace_sample_ratio})")

    @property
    def enabled(self) -> bool:
        return self.trace_exporter != "none"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the mmcache index")
    namespace: str = setting("epdserve", "prefix of every Redis key this deployment writes")
    shm_dir: str = setting("", "directory for this process's cache bytes (default: a fresh dir in /dev/shm)")
    capacity_bytes: int = setting(2 * GiB, "bytes of entries this process holds before evicting (LRU)")
    preallocate_pool: bool = setting(False, "allocate the host pool's pages at start (/dev/shm must hold "
                                            "capacity_bytes now): first writes into it run ~3x faster, and a "
                                            "mount too small fails at start, not mid-run")
    prefer_shared_memory: bool = setting(True, "read same-host entries in place from shared memory")
    fetch_chunk_bytes: int = setting(2 * MiB, "frame size when streaming entries between hosts")
    redis_timeout_s: float = setting(2.0, "timeout of one Redis round trip (then the index counts as unavailable)")
    heartbeat_interval_s: float = setting(1.0, "owner heartbeat period; an owner silent for 3 periods is dead")
    device_tier: str = setting("", "keep entries on this device (e.g. cuda:0) first; '' = no device tier")
    device_capacity_bytes: int = setting(0, "bytes of the device tier")
    disk_dir: str = setting("", "directory of the disk spill tier (default: under the store directory)")
    disk_capacity_bytes: int = setting(0, "bytes of the disk spill tier; 0 = no disk tier (evictions are dropped)")

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0 (got {self.capacity_bytes})")
        if self.fetch_chunk_bytes <= 0 or self.fetch_chunk_bytes > 32 * MiB:
            raise ValueError(f"fetch_chunk_bytes must be in (0, 32 MiB] (got {self.fetch_chunk_bytes})")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0 (got {self.heartbeat_interval_s})")
        if bool(self.device_tier) != (self.device_capacity_bytes > 0):
            raise ValueError("device_tier and device_capacity_bytes go together: set both or neither")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = setting("", "LLaVA checkpoint directory (default: the tiny demo checkpoint, built on first use)")
    dtype: str = setting("auto", "auto | float32 | float16 | bfloat16 (auto: stored dtype on GPU, float32 on CPU)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    revision: str = setting("", "model revision used in cache keys (default: a fingerprint of the files)")
    threads: int = setting(0, "CPU threads for model work (torch intra-op); 0 = torch's default, one per core. Set "
                              "it when several model services share a machine's cores (oversubscribed OpenMP "
                              "threads spin against each other)")
    zero_work: bool = setting(False, "encode / prefill / decode benchmark mode: speak the real protocol but load no "
                                     "model and compute nothing (for `epdserve bench router`)")
    zero_work_delay_ms: float = setting(0.0, "with --zero-work: simulated service time per encode or prefill call, "
                                             "and per decode token (the first one after it, as the KV hand-off)")


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    max_image_bytes: int = setting(20 * MiB, "largest encoded image accepted")
    max_image_pixels: int = setting(40_000_000, "largest decoded image (width x height) accepted")
    max_images_per_request: int = setting(16, "most images in one request")
    embedding_ttl_s: float = setting(3600.0, "seconds an image embedding stays in the cache after its last use")
    handoff_lease_s: float = setting(120.0, "seconds an embedding stays pinned for prefill unless released sooner")
    max_batch_size: int = setting(32, "most images encoded in one tower call (across requests)")
    max_batch_wait_ms: float = setting(5.0, "longest the first image of a batch waits for more to arrive")
    scorer: str = setting("cls-attention", "token scorer for sparsification: cls-attention | feature-norm | learned")
    predictor_path: str = setting("", "safetensors file of a trained image predictor (scorer 'learned')")
    cuda_graphs: bool = setting(True, "on CUDA, replay the vision tower + projector as CUDA graphs, one per batch "
                                      "bucket up to max_batch_size, captured at start (H100: 1.5x images/s at "
                                      "batch 1, even at 32; docs/BENCHMARKS.md)")
    decode_threads: int = setting(0, "threads decoding and keying images (0: half the cores, at most 8)")

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (got {self.max_batch_size})")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (got {self.decode_threads})")
        if self.scorer == "learned" and not self.predictor_path:
            raise ValueError("scorer 'learned' needs --predictor-path")


FASTKV_HEAD_SELECTIONS = ("group", "per-head")   # GQA-aware (the paper's) | each query head picks, picks summed


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    kv_ttl_s: float = setting(120.0, "seconds published KV stays leased for its decode before it is freed")
    kv_wait_s: float = setting(30.0, "longest a prompt waits for room in the cache pool for its KV (earlier "
                                     "prompts' KV being taken by decode) before RESOURCE_EXHAUSTED; the "
                                     "request's deadline caps it")
    kv_zero_copy: bool = setting(True, "on a GPU, page-lock the cache pool at start (all of it becomes resident) "
                                       "so each layer's KV is copied from the GPU straight into it: one copy "
                                       "instead of two")
    prefix_cache: bool = setting(True, "reuse cached KV of full prompt blocks (lossless) and publish new ones")
    prefix_block_tokens: int = setting(32, "tokens per prefix-cache block (only full blocks are cached)")
    prefix_ttl_s: float = setting(900.0, "seconds a cached prefix block lives after its last use")
    chunk_tokens: int = setting(4096, "MOM mini-sequence length for MLP / LM head (floor min_chunk_tokens)")
    min_chunk_tokens: int = setting(1024, "smallest mini-sequence length")
    last_position_only: bool = setting(True, "run the last layer's MLP, final norm and LM head on the last "
                                             "position only (lossless for the first token)")
    fastkv: bool = setting(False, "FastKV (lossy) for requests that do not say: token-selective propagation + "
                                  "GQA-aware KV compression")
    fastkv_tsp_rate: float = setting(0.2, "FastKV: fraction of the prompt propagated past the TSP layer")
    fastkv_retain_rate: float = setting(0.1, "FastKV: fraction of the prompt's KV kept per layer and KV head")
    fastkv_tsp_layer: int = setting(-1, "FastKV TSP layer (0-based; -1: layer 15 of 32 scaled to the model)")
    fastkv_head_selection: str = setting("group", "FastKV KV selection per KV head: group (GQA-aware: query "
                                                  "heads' scores summed) | per-head (ablation: their picks summed)")
    with_encode: bool = setting(False, "E+P colocated: also serve the encode stage (EncodeService, the encode "
                                       "flags) in this process, on the same port, model thread and cache; "
                                       "route with the router's --encode-colocated")

    def __post_init__(self) -> None:
        if self.kv_wait_s < 0:
            raise ValueError(f"kv_wait_s must be >= 0 (got {self.kv_wait_s})")
        if self.prefix_block_tokens < 1:
            raise ValueError(f"prefix_block_tokens must be >= 1 (got {self.prefix_block_tokens})")
        if self.chunk_tokens < 1 or self.min_chunk_tokens < 1:
            raise ValueError("chunk_tokens and min_chunk_tokens must be >= 1")
        for name in ("fastkv_tsp_rate", "fastkv_retain_rate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] (got {getattr(self, name)})")
        if self.fastkv_head_selection not in FASTKV_HEAD_SELECTIONS:
            raise ValueError(f"fastkv_head_selection must be one of {FASTKV_HEAD_SELECTIONS} "
                             f"(got {self.fastkv_head_selection!r})")


EXPERT_PREFETCH = ("skip-gate", "learned", "reorder", "on-demand")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens_limit: int = setting(1 << 16, "largest max_new_tokens one request may ask for")
    max_running: int = setting(64, "sequences decoding at once (the largest batch)")
    max_context: int = setting(131072, "most KV rows one sequence may reserve (prompt rows + max_new_tokens)")
    block_size: int = setting(16, "KV rows per cache block (a power of two, 1..256)")
    kv_cache_gib: float = setting(0.0, "GiB of KV cache blocks (0 = auto: --kv-cache-fraction of free GPU memory "
                                       "after the weights, 256 MiB on CPU)")
    kv_cache_fraction: float = setting(0.9, "share of the GPU's free memory an automatic KV cache takes (lower it "
                                            "when other stages share the GPU)")
    cuda_graphs: bool = setting(True, "replay decode steps as CUDA graphs (dense models on CUDA)")
    held_kv_gib: float = setting(8.0, "GiB of hand-off KV taken from the cache ahead of free KV blocks (requests "
                                      "waiting for blocks hold private copies); further requests wait with their "
                                      "KV left in the prefill's pool (one larger request alone is always let in)")
    text_keep_rate: float = setting(1.0, "generated-token sparsification (Dynamic-LLaVA decode): target fraction "
                                         "of new tokens whose KV is kept (1.0 = off, exact)")
    text_sparsify_layer: int = setting(2, "first decoder layer where dropped tokens' KV is not kept")
    text_scorer: str = setting("hidden-norm", "keep decision: hidden-norm (training-free) or learned")
    text_predictor: str = setting("", "safetensors file of a trained output-text predictor (--text-scorer learned)")
    local_prefill: bool = setting(True, "prefill short prompts here (the router's E -> PD path)")
    with_encode: bool = setting(False, "aggregated E+PD: also serve the encode stage (EncodeService, the encode "
                                       "flags; --cuda-graphs applies to both) in this process, on the same port, "
                                       "model thread and cache; route with the router's --encode-colocated and "
                                       "no --prefill")
    local_prefill_max_tokens: int = setting(4096, "longest prompt this service prefills itself")
    insertion_policy: str = setting("lagrangian", "when to pause decodes for local prefills: lagrangian or fcfs")
    host_kv_gib: float = setting(0.0, "GiB of pinned host memory for the KV of offloaded decoder layers "
                                      "(0 = off: all KV on the GPU); decode steps then run eager (no CUDA graphs)")
    gpu_kv_layers: int = setting(0, "with host_kv_gib > 0: the first N decoder layers keep their KV on the GPU")
    staging_tokens: int = setting(0, "with host_kv_gib > 0: KV rows of all running sequences together that one "
                                     "GPU staging buffer holds (0 = max_context)")
    expert_cache_rate: float = setting(1.0, "MoE expert offloading (ProMoE): fraction of each layer's experts kept in "
                                            "a GPU cache, the rest in pinned host memory (1.0 = off: all on the GPU)")
    expert_cache_gib: float = setting(0.0, "MoE expert offloading by byte budget: GiB of GPU expert cache, all layers "
                                           "together (0 = use --expert-cache-rate)")
    expert_prefetch: str = setting("skip-gate", "offloaded experts: skip-gate (predict the next layers' experts from "
                                                "this layer's input), learned, reorder (no prediction), or on-demand")
    expert_predictor: str = setting("", "safetensors file of a trained expert predictor (--expert-prefetch learned)")
    expert_prefetch_distance: int = setting(1, "offloaded experts: predict layer l + d from layer l")

    @property
    def expert_offload(self) -> bool:
        return self.expert_cache_rate < 1.0 or self.expert_cache_gib > 0

    def __post_init__(self) -> None:
        self._check_expert_offload()
        if self.block_size < 1 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two in [1, 256] (got {self.block_size})")
        if not 0.0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(f"kv_cache_fraction must be in (0, 0.95] (got {self.kv_cache_fraction})")
        if not self.held_kv_gib > 0:
            raise ValueError(f"held_kv_gib must be > 0 (got {self.held_kv_gib})")
        for name in ("max_running", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.kv_cache_gib >= 0:
            raise ValueError(f"kv_cache_gib must be >= 0 (got {self.kv_cache_gib})")
        for name in ("host_kv_gib", "gpu_kv_layers", "staging_tokens"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.host_kv_gib > 0 and 0 < self.staging_tokens < self.max_context:
            raise ValueError(f"staging_tokens ({self.staging_tokens}) must be >= max_context ({self.max_context}) "
                             "so one sequence always fits")
        if self.insertion_policy not in ("lagrangian", "fcfs"):
            raise ValueError(f"insertion_policy must be lagrangian or fcfs (got {self.insertion_policy!r})")
        if not 0.0 < self.text_keep_rate <= 1.0:
            raise ValueError(f"text_keep_rate must be in (0, 1] (got {self.text_keep_rate})")
        if self.text_scorer not in ("hidden-norm", "learned") or (self.text_scorer == "learned"
                                                                  and not self.text_predictor):
            raise ValueError(f"text_scorer must be hidden-norm, or learned with --text-predictor "
                             f"(got {self.text_scorer!r})")

    def _check_expert_offload(self) -> None:
        if not 0.0 < self.expert_cache_rate <= 1.0:
            raise ValueError(f"expert_cache_rate must be in (0, 1] (got {self.expert_cache_rate})")
        if not self.expert_cache_gib >= 0:
            raise ValueError(f"expert_cache_gib must be >= 0 (got {self.expert_cache_gib})")
        if self.expert_cache_rate < 1.0 and self.expert_cache_gib > 0:
            raise ValueError("set expert_cache_rate or expert_cache_gib, not both")
        if self.expert_prefetch not in EXPERT_PREFETCH:
            raise ValueError(f"expert_prefetch must be one of {', '.join(EXPERT_PREFETCH)} "
                             f"(got {self.expert_prefetch!r})")
        if (self.expert_prefetch == "learned") != bool(self.expert_predictor):
            raise ValueError("expert_predictor (a safetensors file) goes with expert_prefetch learned, and learned "
                             "needs it")
        if self.expert_prefetch_distance < 1:
            raise ValueError(f"expert_prefetch_distance must be >= 1 (got {self.expert_prefetch_distance})")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    encode: tuple[str, ...] = setting((), "encode service address(es) host:port, or k8s://NAMESPACE/SERVICE[:PORT] "
                                          "to follow a Kubernetes Service's EndpointSlices")
    encode_colocated: bool = setting(False, "E+P colocated: the prefill replicas also encode (they run "
                                            "--with-encode); no --encode addresses. A request's images are "
                                            "encoded on the prefill replica chosen for it. With no --prefill "
                                            "either (aggregated), the decode replicas encode and prefill "
                                            "every request themselves (E -> PD)")
    prefill: tuple[str, ...] = setting((), "prefill service address(es) host:port, or k8s://NAMESPACE/SERVICE[:PORT]")
    decode: tuple[str, ...] = setting((), "decode service address(es) host:port, or k8s://NAMESPACE/SERVICE[:PORT]")
    default_max_tokens: int = setting(16, "max_tokens when a request does not set it")
    max_prompt_bytes: int = setting(1 * MiB, "largest prompt text accepted (UTF-8 bytes)")
    max_images_per_request: int = setting(16, "most images in one request")
    max_image_bytes: int = setting(20 * MiB, "largest encoded image accepted")
    max_stop_strings: int = setting(16, "most stop strings in one request")
    max_stop_string_chars: int = setting(256, "longest stop string")
    max_batch_requests: int = setting(10_000, "most requests in one GenerateBatch call (offline batch jobs)")
    request_timeout_s: float = setting(600.0, "deadline of one request across all stages when the client sets none")
    max_in_flight: int = setting(192, "online requests (gRPC Generate and HTTP) the router runs at once; the next "
                                      "one is rejected with RESOURCE_EXHAUSTED (HTTP 429) and a retry-after hint "
                                      "(keep it under --max-concurrent-rpcs, whose own rejection has no hint; an "
                                      "offline batch counts as one; 0 = no cap)")
    stage_retries: int = setting(1, "times a request is re-run from encode when a cache entry vanished between stages")
    image_keep_ratio: float = setting(1.0, "fraction of each image's tokens the encode stage keeps "
                                           "(sparsification) when a request does not say; 1.0 = lossless")
    tenant_salt_file: str = setting("", "file holding a secret: each tenant (metadata x-epdserve-tenant) then gets "
                                        "cache keys no other tenant can hit")
    health_interval_s: float = setting(0.5, "how often the router polls every replica's health and load report")
    slo_ttft_s: float = setting(0.0, "time-to-first-token SLO: requests predicted to miss it on every placement are "
                                     "rejected at arrival with RESOURCE_EXHAUSTED (0 = no early rejection)")
    slo_tpot_s: float = setting(0.0, "time-per-output-token SLO for early rejection (0 = not checked)")
    local_prefill_tokens: int = setting(0, "prompts up to this many tokens may take the E -> PD path (the decode "
                                           "replica prefills them, without the prefix cache) when the cost model "
                                           "predicts an earlier first token there (0 = never)")
    http_port: int = setting(-1, "port of the OpenAI-compatible HTTP front door (/v1/chat/completions, /v1/models, "
                                 "/health); -1 = off, 0 = pick a free port (reported in --ready-file as http_address)")
    http_host: str = setting("127.0.0.1", "bind address of the HTTP front door")
    served_model_name: str = setting("", "model name the HTTP front door serves (default: the checkpoint directory's "
                                         "name)")
    image_url_allowlist: tuple[str, ...] = setting((), "hosts whose http(s) image URLs the HTTP front door may fetch "
                                                       "(exact host names; default: none, data URLs only)")
    cache_redis_url: str = setting("", "Redis of the stages' mmcache index: the router reads it to find each "
                                       "prompt's cached prefix (cache-aware prefill choice); '' = not cache-aware")
    cache_namespace: str = setting("epdserve", "the stages' mmcache namespace (--namespace of the stages)")
    kv_transfer_gb_s: float = setting(5.0, "GB/s assumed for moving cached prefix blocks a prefill replica does "
                                           "not hold (blocks of another host or another process's GPU)")

    def __post_init__(self) -> None:
        if self.encode_colocated and self.encode:
            raise ValueError("--encode-colocated: encode runs in the prefill replicas; give no --encode address")
        if self.aggregated and (self.slo_ttft_s > 0 or self.slo_tpot_s > 0):
            raise ValueError("--slo-ttft-s / --slo-tpot-s (early rejection) need prefill replicas; an aggregated "
                             "deployment (--encode-colocated, no --prefill) has none")
        for stage in self.pool_stages():
            addresses = getattr(self, stage)
            if not addresses:
                raise ValueError(f"router needs at least one --{stage} address")
            if any(a.startswith("k8s://") for a in addresses) and len(addresses) > 1:
                raise ValueError(f"--{stage}: a k8s://NAMESPACE/SERVICE address is the whole pool (found "
                                 f"{len(addresses)} addresses)")
        if not 0.0 < self.image_keep_ratio <= 1.0:
            raise ValueError(f"image_keep_ratio must be in (0, 1] (got {self.image_keep_ratio})")
        if self.max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0 (got {self.max_in_flight})")

    def pool_stages(self) -> tuple[str, ...]:
        """The stages that need their own replica addresses."""
        if not self.encode_colocated:
            return ("encode", "prefill", "decode")
        return ("prefill", "decode") if self.prefill else ("decode",)

    @property
    def aggregated(self) -> bool:
        """Every stage in the decode replicas: encode colocated there, every prompt prefilled there."""
        return self.encode_colocated and not self.prefill

    def encode_addresses(self) -> tuple[str, ...]:
        """Where encode calls go: the encode replicas, or, colocated, the replicas that prefill."""
        if not self.encode_colocated:
            return self.encode
        return self.prefill or self.decode


# ---- CLI plumbing: flags from fields -------------------------------------------------------------

C = TypeVar("C")


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per field of `cls` (help text from the field). Defaults stay None on the
    parser so `config_from_args` can tell "not given" from "given"."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is int and f.name.endswith("_bytes"):
            group.add_argument(flag, dest=f.name, type=parse_size, default=None,
                               help=help_text + "; accepts a unit, e.g. 24Gi, 512MiB, 2G")
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, dest=f.name, action="append", default=None, help=help_text + "; repeatable")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "24Gi", "512MiB", "2G" or "1.5GB" (Kubernetes-style units; a
    trailing B is optional). Raises argparse.ArgumentTypeError naming the accepted forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes, optionally with a unit (e.g. 24Gi, 512MiB, 2G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = tuple(_split_list(value)) if isinstance(value, list) else value
    values.update(overrides)
    return cls(**values)


def _split_list(items: list[str]) -> list[str]:
    return [part for item in items for part in item.split(",") if part]


def config_to_args(config: Any) -> list[str]:
    """The CLI flags that reproduce `config` (used to start service processes)."""
    args: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            args.extend(a for item in value for a in (flag, str(item)))
        else:
            args.extend((flag, str(value)))
    return args
