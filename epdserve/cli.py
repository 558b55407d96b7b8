"""The `epdserve` command.

  epdserve demo                                   one image+text request through a local cluster
  epdserve up [--model DIR] [--redis-url URL] [--port N]   run the four services until Ctrl-C
  epdserve generate --router ADDR [--image FILE]... PROMPT
  epdserve serve encode|prefill|decode|router ...  one service process (flags: --help)
  epdserve model tiny --out DIR [--backbone B]     write a tiny random checkpoint
  epdserve cache stats|flush|inspect KEY          look at (or flush) the mmcache index
  epdserve sparsify train --images D --prompts F --out P   train the learned image-token scorer
  epdserve bench cache [--json]                    memcpy vs shared-memory vs stream vs index throughput
  epdserve batch FILE.jsonl --router ADDR --out OUT.jsonl   offline batch, makespan-packed, results as JSONL
  epdserve bench router [--json]                   router overhead (p50/p99 added ms) and requests/s
  epdserve bench quality [--examples N] [--out D]  accuracy of the lossy techniques on the visual-QA model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import signal
import sys

from epdserve.cliutil import run_subcommand
from epdserve.config import SecurityConfig, TraceConfig, add_config_args, config_from_args
from epdserve.env import read_env
from epdserve.errors import EpdserveError, InvalidArgumentError

STAGES = ("encode", "prefill", "decode", "router")
LAYOUTS = ("separate", "colocated", "aggregated")   # `epdserve up --layout`


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "serve" and argv[1] in STAGES:
        return _serve(argv[1], argv[2:])  # the service parses its own flags
    return run_subcommand(_parser(), argv, (EpdserveError,))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epdserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(title="commands")

    serve = sub.add_parser("serve", help="run one service process")
    serve.add_argument("stage", choices=STAGES)

    up = sub.add_parser("up", help="run redis + the four services locally until Ctrl-C")
    _model_flag(up)
    up.add_argument("--redis-url", default="", help="use this Redis instead of starting a private redis-server")
    up.add_argument("--host", default="127.0.0.1", help="router bind address (default: loopback)")
    up.add_argument("--port", type=int, default=50051, help="router port (0 = a free port)")
    up.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    up.add_argument("--layout", choices=LAYOUTS, default="separate",
                    help="separate: encode, prefill and decode processes; colocated: the prefill process also "
                         "encodes; aggregated: one decode process encodes, prefills and decodes")
    add_config_args(up, TraceConfig)
    add_config_args(up, SecurityConfig)
    up.set_defaults(run=_up)

    demo = sub.add_parser("demo", help="start a local cluster, send one image+text request, stop")
    _model_flag(demo)
    demo.add_argument("--prompt", default=None, help="question about the image")
    demo.add_argument("--image", type=pathlib.Path, default=None, help="image file (default: a generated picture)")
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the streamed text")
    add_config_args(demo, TraceConfig)
    demo.set_defaults(run=_demo)

    gen = sub.add_parser("generate", help="send one request to a running router")
    gen.add_argument("--router", required=True, help="router address host:port")
    gen.add_argument("--image", action="append", default=[], type=pathlib.Path, help="image file; repeatable")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--image-keep-ratio", type=float, default=None,
                     help="fraction of each image's tokens the encode stage keeps (sparsification)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as written (with its own image placeholders)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text and token_ids")
    gen.add_argument("--timeout", type=float, default=600.0, help="request deadline in seconds")
    gen.add_argument("prompt")
    add_config_args(gen, SecurityConfig)
    gen.set_defaults(run=_generate)

    batch = sub.add_parser("batch", help="run an offline batch (JSONL of generate requests) through a router")
    batch.add_argument("requests", type=pathlib.Path, help="JSONL: one object per line with prompt, and optionally "
                       "images (file paths), max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, raw")
    batch.add_argument("--router", required=True, help="router address host:port")
    batch.add_argument("--out", type=pathlib.Path, required=True, help="results JSONL, written as they finish")
    batch.add_argument("--timeout", type=float, default=None, help="deadline of the whole batch in seconds")
    add_config_args(batch, SecurityConfig)
    batch.set_defaults(run=_batch)

    sparsify = sub.add_parser("sparsify", help="vision-token sparsification tools")
    train = sparsify.add_subparsers(title="sparsify commands").add_parser(
        "train", help="train the image-token predictor (scorer 'learned') on a checkpoint by distillation")
    _model_flag(train)
    train.add_argument("--images", type=pathlib.Path, required=True, help="folder of images")
    train.add_argument("--prompts", type=pathlib.Path, required=True, help="text file, one prompt per line")
    train.add_argument("--out", type=pathlib.Path, required=True, help="predictor .safetensors to write")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--layer", type=int, default=2, help="decoder layer whose attention is distilled")
    train.add_argument("--width", type=int, default=512)
    train.add_argument("--lr", type=float, default=1e-4)  # = predictor_train.TrainConfig.lr
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=_sparsify_train)

    cache = sub.add_parser("cache", help="inspect or flush the mmcache index")
    cache_sub = cache.add_subparsers(title="cache commands")
    for name, help_text in (("stats", "entries by kind and what each live owner holds"),
                            ("flush", "drop every index entry of the namespace (owners free bytes by TTL)"),
                            ("inspect", "one entry's header, owner and TTL")):
        command = cache_sub.add_parser(name, help=help_text)
        command.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
        command.add_argument("--namespace", default="epdserve")
        command.add_argument("--json", action="store_true")
        if name == "stats":
            add_config_args(command, SecurityConfig)  # owners' CacheControl.Stats needs them when they are secured
        if name == "inspect":
            command.add_argument("key")
        if name == "flush":
            command.add_argument("--yes", action="store_true", help="really flush")
        command.set_defaults(run=_cache, cache_command=name)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(title="benchmarks")
    bench_cache = bench_sub.add_parser("cache", help="mmcache throughput: memcpy vs shm vs stream vs index ops")
    bench_cache.add_argument("--redis-url", default="", help="default: a private redis-server")
    bench_cache.add_argument("--repeats", type=int, default=7)
    bench_cache.add_argument("--json", action="store_true")
    bench_cache.set_defaults(run=_bench_cache)
    bench_router = bench_sub.add_parser("router", help="router overhead and requests/s with zero-work stage replicas")
    bench_router.add_argument("--model", type=pathlib.Path, default=None, help="checkpoint (its tokenizer is used)")
    bench_router.add_argument("--requests", type=int, default=300, help="sequential requests for the percentiles")
    bench_router.add_argument("--seconds", type=float, default=5.0, help="duration of each requests/s run")
    bench_router.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    bench_router.add_argument("--json", action="store_true")
    bench_router.set_defaults(run=_bench_router)
    bench_quality = bench_sub.add_parser("quality", help="accuracy of vision-token sparsification (per scorer and "
                                                         "keep ratio) and MOM on the visual-QA model, served")
    _add_quality_arguments(bench_quality)
    bench_quality.set_defaults(run=_bench_quality)

    model = sub.add_parser("model", help="checkpoint tools")
    model_sub = model.add_subparsers(title="model commands")
    tiny = model_sub.add_parser("tiny", help="write a tiny random LLaVA checkpoint that transformers can load")
    tiny.add_argument("--out", type=pathlib.Path, required=True)
    tiny.add_argument("--backbone", choices=("llama", "mistral", "qwen2", "mixtral"), default="llama")
    tiny.add_argument("--vision", choices=("clip", "siglip"), default="clip")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_model_tiny)
    return parser


def _model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="LLaVA checkpoint directory (default: the tiny visual-QA model shipped in the package)")


def _serve(stage: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"services.{stage}.server").main(argv)


def _default_model(model: pathlib.Path | None) -> pathlib.Path:
    if model is not None:
        from epdserve.models.spec import load_spec

        load_spec(model)  # fail here, clearly, rather than in four services
        return model
    from epdserve.models.tiny import TinySpec, cached_tiny_checkpoint, shipped_vqa_checkpoint

    return shipped_vqa_checkpoint() or cached_tiny_checkpoint(read_env().cache_dir, TinySpec())


def _up(args: argparse.Namespace) -> int:
    from epdserve.launcher import ClusterConfig, LocalCluster

    env = read_env()
    security = _security_config(args)
    _credentials(args)  # unreadable files or a bad token fail here, not in four services
    config = ClusterConfig(model_dir=_default_model(args.model), redis_url=args.redis_url, router_host=args.host,
                           router_port=args.port, device=args.device, redis_server_bin=env.redis_server_bin,
                           trace=_trace_config(args), security=security, encode_colocated=args.layout != "separate",
                           replicas={"prefill": 0} if args.layout == "aggregated" else {})
    cluster = LocalCluster(config)
    for signum in (signal.SIGINT, signal.SIGTERM):   # SIGINT too: a shell's background job starts with it ignored
        signal.signal(signum, _interrupt)
    try:
        address = cluster.start()
        print(f"epdserve is up: router {address} (redis {cluster.redis_url}); Ctrl-C to stop", flush=True)
        print(f'try: epdserve generate --router {address}{_client_flags(security)} "Hello"', flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        codes = cluster.stop()
        print("stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()), flush=True)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> int:
    from epdserve.demo import run_demo

    if not args.json:
        print("starting a local cluster (encode, prefill, decode, router, redis)...", flush=True)
    image = args.image.read_bytes() if args.image else None
    return run_demo(_default_model(args.model), prompt=args.prompt, image=image,
                    max_tokens=args.max_tokens, as_json=args.json, trace=_trace_config(args),
                    token=_credentials(args).token)  # the services take $EPDSERVE_AUTH_TOKEN[_FILE] too


def _security_config(args: argparse.Namespace) -> SecurityConfig:
    try:
        return config_from_args(SecurityConfig, args)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


def _credentials(args: argparse.Namespace):
    """The token and TLS files of the command's security flags (the environment as fallback)."""
    from epdserve.security import load_credentials

    return load_credentials(_security_config(args), read_env())


def _client_flags(security: SecurityConfig) -> str:
    """The security flags a client of a cluster started with `security` passes."""
    from epdserve.launcher import security_args

    return "".join(f" {arg}" for arg in security_args(security))


def _trace_config(args: argparse.Namespace) -> TraceConfig:
    try:
        return config_from_args(TraceConfig, args)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


def _generate(args: argparse.Namespace) -> int:
    from epdserve.sdk import Client

    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, raw=args.raw,
                   image_keep_ratio=args.image_keep_ratio)
    credentials = _credentials(args)
    with Client(args.router, timeout_s=args.timeout, token=credentials.token, tls=credentials.tls) as client:
        stream = client.stream(args.prompt, images=args.image, **options)
        for chunk in stream:
            if not args.json:
                print(chunk.text, end="", flush=True)
        result = stream.result
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": list(result.token_ids),
                          "finish_reason": result.finish_reason, "usage": vars(result.usage),
                          "timings_ms": result.timings_ms}))
    else:
        print()
    return 0


def _cache(args: argparse.Namespace) -> int:
    import asyncio

    import redis.exceptions as redis_errors

    from mmcache import admin

    if args.cache_command == "flush" and not args.yes:
        print("error: flush drops the whole index of the namespace; pass --yes", file=sys.stderr)
        return 2

    async def run():
        import redis.asyncio as aioredis

        redis = aioredis.from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            if args.cache_command == "stats":
                return await admin.stats(redis, args.namespace, _credentials(args))
            if args.cache_command == "flush":
                return {"removed": await admin.flush(redis, args.namespace)}
            return await admin.inspect(redis, args.namespace, args.key)
        finally:
            await redis.aclose()

    try:
        result = asyncio.run(run())
    except (OSError, redis_errors.RedisError) as exc:
        print(f"error: cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    if result is None:
        print(f"error: {args.key} is not in the index", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _sparsify_train(args: argparse.Namespace) -> int:
    import dataclasses

    from services.encode.predictor_train import TrainConfig, load_samples, save_predictor, train_predictor

    samples = load_samples(args.images, args.prompts)
    config = TrainConfig(steps=args.steps, layer=args.layer, width=args.width, lr=args.lr, seed=args.seed)
    predictor, report = train_predictor(_default_model(args.model), samples, config)
    save_predictor(predictor, args.out, report)
    print(json.dumps({"out": str(args.out), **dataclasses.asdict(report)}))
    return 0


def _bench_cache(args: argparse.Namespace) -> int:
    from mmcache.bench import run_cache_bench

    result = run_cache_bench(args.redis_url, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    for key in ("memcpy_gbps", "shm_gbps", "stream_gbps", "index_ops_per_s", "shm_vs_memcpy"):
        print(f"{key:<16} {result[key]:12.2f}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from epdserve.sdk import BatchSummary, Client

    requests = _read_batch(args.requests)
    credentials = _credentials(args)
    summary = None
    with Client(args.router, timeout_s=args.timeout, token=credentials.token, tls=credentials.tls) as client, \
            open(args.out, "w") as out, \
            tqdm(total=len(requests), unit="req", file=sys.stderr) as progress:
        for item in client.batch(requests):
            if isinstance(item, BatchSummary):
                summary = item
                continue
            out.write(json.dumps(_batch_line(item)) + "\n")
            out.flush()
            progress.update(1)
    gap = summary.makespan_s / summary.lower_bound_s if summary.lower_bound_s else float("nan")
    print(f"{summary.requests} requests ({summary.failed} failed) on {summary.slots} decode slots: makespan "
          f"{summary.makespan_s:.2f} s, planned {summary.predicted_makespan_s:.2f} s, lower bound "
          f"{summary.lower_bound_s:.2f} s (x{gap:.2f})")
    return 1 if summary.failed else 0


def _read_batch(path: pathlib.Path) -> list[dict]:
    """Requests of a JSONL file; image paths are read into bytes. Raises SystemExit on a bad line."""
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            request["images"] = [pathlib.Path(p).read_bytes() for p in request.get("images", ())]
        except (ValueError, OSError, AttributeError, TypeError) as exc:
            raise SystemExit(f"{path}:{number}: {exc}") from None
        requests.append(request)
    return requests


def _batch_line(item) -> dict:
    line = {"index": item.index}
    if item.error is not None:
        return {**line, "error": {"code": type(item.error).code, "message": str(item.error)}}
    r = item.result
    return {**line, "request_id": r.request_id, "text": r.text, "token_ids": list(r.token_ids),
            "finish_reason": r.finish_reason, "usage": dataclasses.asdict(r.usage)}


def _bench_router(args: argparse.Namespace) -> int:
    from services.router.bench import RouterBenchConfig, markdown, run_router_bench

    config = RouterBenchConfig(requests=args.requests, seconds=args.seconds, concurrency=tuple(args.concurrency))
    report = run_router_bench(_default_model(args.model), config)
    print(json.dumps(report) if args.json else markdown(report))
    return 0


def _add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    from quality.bench import add_arguments

    add_arguments(parser)


def _bench_quality(args: argparse.Namespace) -> int:
    from quality.bench import run

    return run(args)


def _model_tiny(args: argparse.Namespace) -> int:
    from epdserve.models.tiny import TinySpec, build_tiny_checkpoint

    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 1
    path = build_tiny_checkpoint(args.out, TinySpec(backbone=args.backbone, vision=args.vision, seed=args.seed))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
