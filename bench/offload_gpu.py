"""Offloaded-KV decode benchmark: Llama-3-8B shapes, bf16, random weights, batch 1.

At --context tokens (32k) one sequence decodes with its KV
- all on the GPU (the plain engine, eager and CUDA-graphed),
- every layer offloaded to pinned host memory (staged to the GPU one layer ahead on a side stream),
- hybrid: the first half of the layers on the GPU, the rest offloaded;
each with the step time, the KV bytes fetched from the host per step and the achieved PCIe
fraction = (bytes fetched per step / pinned host->device bandwidth measured here) / step time
(1.0: the step takes exactly as long as its copies). Then the longest contexts the offloaded mode
decodes (--long), skipping any whose host pools would pass --host-limit-gib. The prompt KV is
random (step time does not depend on its values) and admitted through the engine's normal path.

    python bench/offload_gpu.py --out docs/results/offload-h200.json
    python bench/offload_gpu.py --smoke      # CPU, tiny shape, seconds (checks the script)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 1 << 30
BLOCK = 16


def tiny_decoder(layers: int):
    """A small random Llama-shaped decoder on the CPU (float32), for --smoke."""
    from transformers import LlamaConfig

    from epdserve.models.decoder import Decoder
    from epdserve.models.layers import RotaryEmbedding
    from epdserve.models.spec import _decoder_spec

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
    spec = _decoder_spec(config, (1,))
    torch.manual_seed(0)
    return Decoder(spec, RotaryEmbedding.from_hf_config(config, spec.head_dim, spec.rope_type)).eval()


def h2d_bandwidth(device: torch.device) -> float:
    """Bytes/s of a pinned host->device copy (on CPU: a plain memory copy, the smoke stand-in)."""
    if device.type == "cuda":
        from bench.decode_gpu import pinned_h2d_bandwidth

        return pinned_h2d_bandwidth()
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.numel() / statistics.median(times)


def layer_bytes_per_token(spec, dtype: torch.dtype) -> int:
    """K and V bytes of one token in one layer."""
    return 2 * spec.num_kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()


def config_for(decoder, context: int, steps: int, graphs: bool = False):
    """A batch-1 DecodeConfig whose explicit GPU KV budget holds `context + steps` rows of every layer
    (the offloaded mode uses it for its GPU layers and staging buffers)."""
    from epdserve.config import DecodeConfig

    max_context = context + steps + 2 * BLOCK
    layers = decoder.spec.num_layers
    per_layer = (math.ceil(max_context / BLOCK) + 4) * BLOCK * layer_bytes_per_token(decoder.spec, decoder.dtype)
    gpu_gib = (layers + 2) * per_layer / GIB  # every layer's pools, or GPU layers' pools + two staging buffers
    return DecodeConfig(max_running=1, max_context=max_context, block_size=BLOCK, kv_cache_gib=gpu_gib,
                        cuda_graphs=graphs, local_prefill=False)


def build(decoder, mode: str, context: int, steps: int):
    """mode: "gpu" | "gpu-graphs" | "offload:<gpu layers>"."""
    from services.decode.offload_runner import build_offloaded_engine
    from services.decode.setup import build_engine

    config = config_for(decoder, context, steps, graphs=mode == "gpu-graphs")
    if mode.startswith("gpu"):
        return build_engine(decoder, config)
    gpu_layers = int(mode.split(":")[1])
    offloaded = decoder.spec.num_layers - gpu_layers
    per_layer = (math.ceil(config.max_context / BLOCK) + 4) * BLOCK * layer_bytes_per_token(decoder.spec, decoder.dtype)
    return build_offloaded_engine(decoder, config, gpu_layers=gpu_layers, host_kv_gib=offloaded * per_layer / GIB,
                                  staging_tokens=config.max_context)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(decoder, engine, context: int, steps: int) -> tuple[float, float]:
    """(median seconds per DecodeEngine.step, host->device KV bytes per step) for one sequence of
    `context` random prompt rows."""
    from epdserve.engine.sampler import SamplingParams
    from services.decode.engine import DecodeJob

    spec = decoder.spec
    layer = torch.randn(2, spec.num_kv_heads, context, spec.head_dim, dtype=decoder.dtype, device=decoder.device)
    engine.step([DecodeJob("r", [layer] * spec.num_layers, context, 1, steps + 4, SamplingParams(temperature=0.0))])
    del layer
    copied = getattr(engine.runner, "copied_bytes", 0)
    times = []
    for _ in range(steps):
        synchronize(decoder.device)
        start = time.perf_counter()
        assert engine.step().batch_size == 1
        times.append(time.perf_counter() - start)
    fetched = (getattr(engine.runner, "copied_bytes", 0) - copied) / steps
    return statistics.median(times[2:] if steps > 4 else times), fetched


def measure(decoder, mode: str, context: int, steps: int, bandwidth: float) -> dict:
    """One row: step time, bytes fetched, PCIe fraction, KV memory on the device and the host."""
    row, engine = {"mode": mode, "context": context}, None
    started = time.perf_counter()
    try:
        engine = build(decoder, mode, context, steps)
        row["setup_s"] = time.perf_counter() - started
        seconds, fetched = step_seconds(decoder, engine, context, steps)
        row.update(step_ms=seconds * 1000, fetched_gib=fetched / GIB, pcie_limit_ms=fetched / bandwidth * 1000,
                   pcie_fraction=fetched / bandwidth / seconds, **kv_memory(engine.kv), completed=True)
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as exc:
        row.update(completed=False, error=str(exc)[:300])
    finally:
        engine = None  # the host pools go (and are unlocked) before the next case allocates its own
    gc.collect()
    if decoder.device.type == "cuda":
        torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def kv_memory(kv) -> dict:
    device = {t.data_ptr(): t.nbytes for t in [*kv.keys, *kv.values]}
    host = getattr(kv, "host_keys", None)
    return {"device_kv_gib": sum(device.values()) / GIB, "host_kv_gib": 0.0 if host is None else 2 * host.nbytes / GIB}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "offload-gpu.json")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--long", type=int, nargs="*", default=[262144, 524288], help="contexts for the longest run")
    parser.add_argument("--long-steps", type=int, default=5)
    parser.add_argument("--host-limit-gib", type=float, default=90.0, help="skip contexts whose host pools pass this")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape (4 layers), small contexts")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.context, args.steps, args.long, args.long_steps = 4, 512, 6, [2048, 4096], 3
    return args


def main() -> int:
    args = parse()
    if args.smoke:
        decoder, device_name, model = tiny_decoder(args.layers), "cpu (smoke)", "tiny Llama shape, float32"
    else:
        from bench.prefill_gpu import build_models

        decoder = build_models(args.layers)[1]
        device_name, model = torch.cuda.get_device_name(0), f"Llama-3-8B shapes ({args.layers} layers), bf16"
    bandwidth = h2d_bandwidth(decoder.device)
    report = {"benchmark": "offloaded KV decode", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_name, "torch": torch.__version__, "model": model, "batch": 1,
              "pinned_h2d_gb_s": bandwidth / 1e9, "rows": [], "longest": []}
    half = args.layers // 2
    for mode in ("gpu", "gpu-graphs", "offload:0", f"offload:{half}"):
        report["rows"].append(measure(decoder, mode, args.context, args.steps, bandwidth))
        write(args.out, report)
    per_token = args.layers * layer_bytes_per_token(decoder.spec, decoder.dtype)
    for context in args.long:
        if context * per_token / GIB > args.host_limit_gib:
            report["longest"].append({"mode": "offload:0", "context": context, "completed": False,
                                      "error": f"host pools {context * per_token / GIB:.0f} GiB > limit"})
            continue
        report["longest"].append(measure(decoder, "offload:0", context, args.long_steps, bandwidth))
        write(args.out, report)
    write(args.out, report)
    print(markdown(report))
    return 0


def write(path: pathlib.Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def markdown(report: dict) -> str:
    def cell(row, key, fmt):
        return format(row[key], fmt) if row.get("completed") and key in row else "-"

    lines = [f"Offloaded-KV decode on {report['device']} ({report['model']}), batch 1, {report['date'][:10]}; "
             f"pinned H2D {report['pinned_h2d_gb_s']:.1f} GB/s", "",
             "| mode | context | step (ms) | fetched / step (GiB) | PCIe time (ms) | PCIe fraction | "
             "device KV (GiB) | host KV (GiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"] + report["longest"]:
        status = "" if row.get("completed") else f" ({row.get('error', 'failed')[:60]})"
        lines.append(f"| {row['mode']}{status} | {row['context']} | {cell(row, 'step_ms', '.1f')} | "
                     f"{cell(row, 'fetched_gib', '.2f')} | {cell(row, 'pcie_limit_ms', '.1f')} | "
                     f"{cell(row, 'pcie_fraction', '.2f')} | {cell(row, 'device_kv_gib', '.2f')} | "
                     f"{cell(row, 'host_kv_gib', '.1f')} |")
    done = [row["context"] for row in report["longest"] if row.get("completed")]
    lines += ["", f"Longest context decoded with every layer offloaded: {max(done) if done else 'none'} tokens"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
