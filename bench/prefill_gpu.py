"""Prefill-stage GPU benchmark (issue: prefill MOM + FastKV): Llama-3-8B shapes, bf16, random weights.

Both paths share one set of weights (our decoder's parameters alias the HF model's, no copy):
- HF `transformers` LlamaForCausalLM (SDPA), `logits_to_keep=1` and full logits: TTFT and peak GPU
  memory beyond the weights (KV kept on GPU in a DynamicCache, as HF does).
- epdserve prefill (services.prefill.prefill.forward_prompt): MOM mini-sequences, last position only,
  each layer's KV offloaded to pinned host memory on a side stream: TTFT and peak beyond weights.
- FastKV at the longest length: v2 setting (tsp_rate 0.2, retain 0.1) and v1 setting (TSP length
  2048, budget 512), TTFT; decode tokens/s from the compressed vs the full KV (plain decode loop).
- Greedy agreement at --agree-length: HF generate (16 tokens) vs MOM prefill + our decode loop.
- --probe N...: the longest prompts the MOM path completes (prefill + 16 decoded tokens, KV reloaded).

    python bench/prefill_gpu.py --out bench/results/prefill-h200.json [--lengths 16384 ...] [--probe 262144]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 1 << 30


def llama3_8b(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21,
                       rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa")


def build_models(layers: int):
    from transformers import LlamaForCausalLM

    from epdserve.models.decoder import Decoder
    from epdserve.models.layers import RotaryEmbedding
    from epdserve.models.spec import _decoder_spec

    config = llama3_8b(layers)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf = hf.to_empty(device="cuda").to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)
    with torch.device("cuda"):  # its inv_freq buffer is not a parameter: rebuild it off the meta device
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config)
    spec = _decoder_spec(config, (128001,))
    rope = RotaryEmbedding.from_hf_config(config, spec.head_dim, spec.rope_type).to("cuda")
    with torch.device("meta"):
        ours = Decoder(spec, rope)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, assign=True)  # the same tensors: no second copy of the weights
    return hf, ours.eval()


def _measure(fn):
    """(seconds, peak GPU bytes beyond what was allocated before) of fn(), or (None, None) on OOM."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        out = fn()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return None, None, None
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() - base, out


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 128000, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(length))


def hf_prefill(hf, ids, keep: int):
    with torch.inference_mode():
        out = hf(input_ids=ids, logits_to_keep=keep, use_cache=True)
        return out.logits[0, -1].argmax().item()


def mom_prefill(ours, ids, plan=None, collect=None, allocate=None):
    from services.prefill.layer_kv import CollectedLayers, OffloadingKV, StagedHost, pinned_empty
    from services.prefill.minisequence import MiniSequenceConfig
    from services.prefill.prefill import forward_prompt

    collected = collect if collect is not None else CollectedLayers()
    with torch.inference_mode():
        embeds = ours.embed(ids)[0]
        kv = OffloadingKV("cuda", collected, host=StagedHost(allocate or pinned_empty))
        logits = forward_prompt(ours, embeds, kv, MiniSequenceConfig(), plan)
        layers = collected.layers()  # the host copies are complete: the KV has left the GPU
    return int(logits[0].argmax()), layers


def timed(fn, repeats: int):
    """Median seconds (warm: pinned host buffers and allocator caches reused, as in a running
    service), peak bytes and result of the first (cold) run, and the cold run's seconds."""
    seconds, peak, out = _measure(fn)
    if seconds is None:
        return None, None, None, None
    times = [seconds] + [_measure(fn)[0] for _ in range(repeats - 1)]
    return statistics.median(times), peak, out, seconds


def decode_tokens_per_s(ours, layers, length: int, steps: int = 32) -> float:
    """Batch-1 tokens/s of the decode service's engine (paged KV, CUDA graphs) from these layers."""
    from epdserve.config import DecodeConfig
    from epdserve.engine.sampler import SamplingParams
    from services.decode.engine import DecodeJob
    from services.decode.setup import build_engine

    rows = max(layer.shape[2] for layer in layers)
    engine = build_engine(ours, DecodeConfig(max_running=1, max_context=rows + steps + 8, kv_cache_gib=
                                             (rows + steps + 64) * 128 * 1024 / GIB + 0.5))
    engine.step([DecodeJob("r", layers, length, 1, steps + 4, SamplingParams(temperature=0.0))])
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps - 4):
        engine.step()
    torch.cuda.synchronize()
    return (steps - 4) / (time.perf_counter() - start)


def fastkv_decode_only(ours, length: int) -> dict:
    """Decode tokens/s from the FastKV-compressed vs the full KV of one `length`-token prompt."""
    from services.prefill.fastkv import FastKVConfig

    ids = _ids(length)
    report = {"length": length, "settings": {}}
    for name, config in (("v2 tsp_rate 0.2 retain 0.1", FastKVConfig()),
                         ("v1 tsp_length 2048 budget 512", FastKVConfig(tsp_length=2048, kv_budget=512))):
        _, layers = mom_prefill(ours, ids, config.plan(ours.spec.num_layers, length))
        report["settings"][name] = {"kv_rows_per_layer": [int(t.shape[2]) for t in layers],
                                    "decode_tokens_per_s": decode_tokens_per_s(ours, layers, length)}
        del layers
    _, layers = mom_prefill(ours, ids)
    report["full_kv_decode_tokens_per_s"] = decode_tokens_per_s(ours, layers, length)
    return report


def greedy_agreement(hf, ours, length: int, new: int = 16) -> dict:
    from epdserve.engine.generation import generate
    from epdserve.engine.sampler import SamplingParams
    from services.decode.decoder import TokenDecoder

    ids = _ids(length)
    greedy = SamplingParams(temperature=0.0)
    with torch.inference_mode():
        hf_tokens = hf.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, length:]
        plain = list(generate(ours, ours.embed(ids)[0], new, greedy, ignore_eos=True))  # unchunked, KV on GPU
    first, layers = mom_prefill(ours, ids)
    decoder = TokenDecoder(ours)
    seq = decoder.load(layers, first, new, greedy, length)
    mom = [first] + [decoder.step(seq) for _ in range(new - 1)]
    hf_tokens = hf_tokens.tolist()

    def same(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), new)

    return {"length": length, "hf": hf_tokens, "plain": plain, "mom": mom, "mom_vs_plain": same(mom, plain),
            "mom_vs_hf": same(mom, hf_tokens), "plain_vs_hf": same(plain, hf_tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "prefill-gpu.json")
    parser.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agree-length", type=int, default=32768)
    parser.add_argument("--probe", type=int, nargs="*", default=[])
    parser.add_argument("--skip-hf-full", action="store_true")
    parser.add_argument("--probe-only", action="store_true", help="only run the --probe lengths")
    parser.add_argument("--fastkv-decode-only", type=int, default=0, metavar="LENGTH",
                        help="only measure decode tok/s from FastKV-compressed vs full KV at LENGTH")
    args = parser.parse_args()
    from services.prefill.fastkv import FastKVConfig

    hf, ours = build_models(args.layers)
    if args.fastkv_decode_only:
        result = fastkv_decode_only(ours, args.fastkv_decode_only)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
        return 0
    if args.probe_only:
        report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "probe": []}
        for length in args.probe:
            report["probe"].append(probe(ours, length))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
        return 0
    weights = torch.cuda.memory_allocated()
    report = {"benchmark": "prefill stage", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "model": f"Llama-3-8B shapes ({args.layers} layers), bf16, random weights",
              "weights_gib": weights / GIB, "rows": []}
    mom_prefill(ours, _ids(1024))
    hf_prefill(hf, _ids(1024), 1)
    for length in args.lengths:
        ids = _ids(length)
        row = {"length": length}
        for name, fn in (("hf_last", lambda ids=ids: hf_prefill(hf, ids, 1)),
                         ("hf_full", None if args.skip_hf_full else lambda ids=ids: hf_prefill(hf, ids, 0)),
                         ("mom", lambda ids=ids: mom_prefill(ours, ids)[0])):
            if fn is None:
                continue
            seconds, peak, _, cold = timed(fn, args.repeats)
            row[f"{name}_ttft_s"], row[f"{name}_peak_gib"] = seconds, None if peak is None else peak / GIB
            row[f"{name}_cold_ttft_s"] = cold
            print(length, name, seconds, None if peak is None else peak / GIB, flush=True)
        report["rows"].append(row)
    longest = max(args.lengths)
    ids = _ids(longest)
    fastkv = {}
    for name, config in (("v2 tsp_rate 0.2 retain 0.1", FastKVConfig()),
                         ("v1 tsp_length 2048 budget 512", FastKVConfig(tsp_length=2048, kv_budget=512))):
        plan = config.plan(args.layers, longest)
        seconds, peak, out, _ = timed(lambda plan=plan: mom_prefill(ours, ids, plan), args.repeats)
        fastkv[name] = {"ttft_s": seconds, "peak_gib": peak / GIB, "kv_rows_per_layer": out[1][0].shape[2],
                        "decode_tokens_per_s": decode_tokens_per_s(ours, out[1], longest)}
        print(name, fastkv[name], flush=True)
    _, full_layers = mom_prefill(ours, ids)
    report["fastkv"] = {"length": longest, "settings": fastkv,
                        "full_kv_decode_tokens_per_s": decode_tokens_per_s(ours, full_layers, longest)}
    del full_layers
    report["greedy_agreement"] = greedy_agreement(hf, ours, args.agree_length)
    print("agreement", report["greedy_agreement"], flush=True)
    report["probe"] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))  # kept even if a probe runs out of time
    for length in args.probe:
        report["probe"].append(probe(ours, length))
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


def probe(ours, length: int) -> dict:
    """Prefill `length` tokens with MOM (KV to page-locked host memory of exactly its size), reload
    it, decode 16 tokens."""
    from epdserve.engine.host_memory import page_locked, unpin
    from epdserve.engine.sampler import SamplingParams
    from services.decode.decoder import TokenDecoder

    ids = _ids(length)
    started = time.perf_counter()
    pinned: list[int] = []

    def exact_pinned(shape, dtype):  # pin_memory=True would round each layer up to a power of two
        tensor = page_locked(torch.empty(shape, dtype=dtype))
        pinned.append(tensor.data_ptr())
        return tensor

    try:
        seconds, peak, (first, layers) = _measure(lambda: mom_prefill(ours, ids, allocate=exact_pinned))
        print("probe prefill", length, seconds, "s, host KV GiB", sum(t.nbytes for t in layers) / GIB, flush=True)
        decoder = TokenDecoder(ours)
        seq = decoder.load(layers, first, 16, SamplingParams(temperature=0.0), length)
        unpin(pinned)
        pinned.clear()
        del layers
        tokens = [first] + [decoder.step(seq) for _ in range(15)]
        result = {"length": length, "completed": True, "ttft_s": seconds, "prefill_peak_gib": peak / GIB,
                  "decode_peak_gib": torch.cuda.max_memory_allocated() / GIB, "tokens": len(tokens)}
    except (torch.OutOfMemoryError, RuntimeError, TypeError) as exc:
        result = {"length": length, "completed": False, "error": str(exc)[:200]}
    unpin(pinned)
    result["wall_s"] = time.perf_counter() - started
    print("probe", result, flush=True)
    torch.cuda.empty_cache()
    return result


def markdown(report: dict) -> str:
    def f(value, fmt):
        return "OOM" if value is None else format(value, fmt)

    lines = [f"Prefill on {report['device']} ({report['model']}), {report['date'][:10]}; "
             f"weights {report['weights_gib']:.2f} GiB", "",
             "| tokens | HF last-logit TTFT (s) | HF full TTFT (s) | MOM TTFT (s) | HF last peak (GiB) | "
             "HF full peak (GiB) | MOM peak (GiB) | MOM / HF-last peak |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ratio = (r["mom_peak_gib"] / r["hf_last_peak_gib"]) if r.get("hf_last_peak_gib") and r.get("mom_peak_gib") \
            else None
        lines.append(f"| {r['length']} | {f(r.get('hf_last_ttft_s'), '.2f')} | {f(r.get('hf_full_ttft_s'), '.2f')} | "
                     f"{f(r.get('mom_ttft_s'), '.2f')} | {f(r.get('hf_last_peak_gib'), '.1f')} | "
                     f"{f(r.get('hf_full_peak_gib'), '.1f')} | {f(r.get('mom_peak_gib'), '.1f')} | "
                     f"{f(ratio, '.2f')} |")
    fk = report["fastkv"]
    lossless = next(r["mom_ttft_s"] for r in report["rows"] if r["length"] == fk["length"])
    lines += ["", f"FastKV at {fk['length']} tokens (lossless MOM TTFT {lossless:.2f} s, full-KV decode "
                  f"{fk['full_kv_decode_tokens_per_s']:.1f} tok/s)", "",
              "| setting | TTFT (s) | / lossless | KV rows per layer | decode tok/s | / full KV |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, s in fk["settings"].items():
        speedup = s["decode_tokens_per_s"] / fk["full_kv_decode_tokens_per_s"]
        lines.append(f"| {name} | {s['ttft_s']:.2f} | {s['ttft_s'] / lossless:.2f} | {s['kv_rows_per_layer']} | "
                     f"{s['decode_tokens_per_s']:.1f} | {speedup:.2f} |")
    agree = report["greedy_agreement"]
    lines += ["", f"Greedy agreement at {agree['length']} tokens (identical leading tokens of 16): MOM vs plain "
                  f"path {agree['mom_vs_plain']}, MOM vs HF {agree['mom_vs_hf']}, plain vs HF {agree['plain_vs_hf']}"]
    for p in report["probe"]:
        lines.append(f"- probe {p['length']} tokens: " + (
            f"completed, TTFT {p['ttft_s']:.1f} s, prefill peak beyond weights {p['prefill_peak_gib']:.1f} GiB"
            if p["completed"] else f"failed ({p['error']})"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
