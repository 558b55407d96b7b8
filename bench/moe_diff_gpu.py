"""Where do offloaded-MoE outputs first differ from the resident model? (diagnostic for bench/moe_gpu.py)

Runs the same decode (prompt + random-token steps, as bench/moe_gpu.py) several times on one
Mixtral-shaped decoder and records every MoE call's input and output with forward hooks (clones,
no synchronisation added):
- resident twice: is the all-on-GPU path itself deterministic run to run?
- each offloaded path (on-demand, reorder, skip-gate), optionally with every acquired slot checked
  against the original expert weights (`--verify-slots`, adds a sync per expert).
For each path it reports the first (call, layer) whose MoE input or output differs bitwise from the
first resident run, and for a call whose input matches but output does not, the resident module
recomputed on that input (to separate kernel non-determinism from wrong weights).

    python bench/moe_diff_gpu.py --out $OUT/moe-diff.json
    python bench/moe_diff_gpu.py --smoke --out /tmp/moe_diff.json     # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.moe_gpu import SMOKE, Shape, build_decoder, decode_run, offload_cases  # noqa: E402


class MoERecorder:
    """Forward hooks on every layer's MoE module: records[i] = (layer, input clone, output clone)."""

    def __init__(self, decoder) -> None:
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.feed_forward.register_forward_hook(self._hook(i))
                         for i, layer in enumerate(decoder.layers)]

    def _hook(self, layer: int):
        def record(module, args, out):
            self.records.append((layer, args[0].detach().clone(), out.detach().clone()))
        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def recorded_run(decoder, prompt, feed, args, offloader=None) -> tuple[dict, list]:
    recorder = MoERecorder(decoder)
    try:
        run = decode_run(decoder, prompt, feed, args.new, args.warmup, offloader)
    finally:
        recorder.close()
    return run, recorder.records


class ModuleRecorder:
    """Forward hooks on every named submodule: records[i] = (name, tensor inputs, output) clones."""

    def __init__(self, decoder) -> None:
        self.records: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in decoder.named_modules() if name]

    def _hook(self, name: str):
        def record(module, args, out):
            if isinstance(out, torch.Tensor):
                inputs = [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]
                self.records.append((name, inputs, out.detach().clone()))
        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _records(make_recorder, decoder, prompt, feed, steps: int) -> list:
    """The records of one resident decode run (prompt + `steps` fed steps) with a recorder active."""
    recorder = make_recorder()
    try:
        decode_run(decoder, prompt, feed, steps, 0)
    finally:
        recorder.close()
    return recorder.records


def localize(decoder, prompt, feed, steps: int, runs: int) -> list[dict]:
    """Run the resident decoder `runs` times over the prompt and `steps` decode steps; report, per
    repeat, the first module call whose inputs equal the first run's but whose output does not."""
    def one_run():
        return _records(lambda: ModuleRecorder(decoder), decoder, prompt, feed, steps)

    reference, found = one_run(), []
    for repeat in range(1, runs):
        records, first = one_run(), None
        for call, ((name, xs_ref, y_ref), (_, xs, y)) in enumerate(zip(reference, records)):
            if all(torch.equal(a, b) for a, b in zip(xs_ref, xs)) and not torch.equal(y_ref, y):
                first = {"repeat": repeat, "call": call, "module": name, "shape": list(y.shape),
                         "dtype": str(y.dtype), "differing_elements": int((y != y_ref).sum()),
                         "max_abs_diff": float((y.float() - y_ref.float()).abs().max()),
                         "inputs": [list(x.shape) for x in xs]}
                module = decoder.get_submodule(name)
                if not list(module.children()):  # a leaf (Linear, norm): repeat it alone on the same input
                    with torch.inference_mode():
                        outs = [module(*xs) for _ in range(20)]
                    first["isolated_distinct_outputs_of_20"] = len({o.float().sum().item() for o in outs})
                break
        found.append(first or {"repeat": repeat, "identical": True, "calls": len(records)})
        print(found[-1], flush=True)
    return found


class SdpaRecorder:
    """Wraps torch.nn.functional.scaled_dot_product_attention while active: records (q, k, v, kwargs,
    output) clones of every call."""

    def __init__(self) -> None:
        import torch.nn.functional as F

        self.records: list[tuple] = []
        self._F, self._original = F, F.scaled_dot_product_attention

        def wrapped(q, k, v, **kwargs):
            out = self._original(q, k, v, **kwargs)
            mask = kwargs.get("attn_mask")
            self.records.append((q.clone(), k.clone(), v.clone(), k.stride(), None if mask is None else mask.clone(),
                                 {n: x for n, x in kwargs.items() if n != "attn_mask"}, out.clone()))
            return out

        F.scaled_dot_product_attention = wrapped

    def close(self) -> None:
        self._F.scaled_dot_product_attention = self._original


def localize_sdpa(decoder, prompt, feed, steps: int, runs: int) -> list[dict]:
    """Like `localize` for the attention kernel alone: the first SDPA call with equal q, k, v (and
    mask) but a different output; that call is then repeated alone, with each backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def one_run():
        return _records(SdpaRecorder, decoder, prompt, feed, steps)

    reference, found = one_run(), []
    for repeat in range(1, runs):
        records, first = one_run(), None
        for call, (ref, rec) in enumerate(zip(reference, records)):
            same = all(torch.equal(a, b) for a, b in zip(ref[:3], rec[:3])) and (
                (ref[4] is None and rec[4] is None) or torch.equal(ref[4], rec[4]))
            if same and not torch.equal(ref[6], rec[6]):
                q, k, v, stride, mask, kwargs, out = rec
                first = {"repeat": repeat, "call": call, "q": list(q.shape), "k": list(k.shape),
                         "k_stride_in_model": list(stride), "kwargs": {n: str(x) for n, x in kwargs.items()},
                         "differing_elements": int((out != ref[6]).sum())}
                for name, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                                      ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
                    try:
                        with torch.inference_mode(), sdpa_kernel(backend) if backend else contextlib.nullcontext():
                            outs = [torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
                                    for _ in range(200)]
                        first[f"alone_{name}_differ_of_200"] = sum(not torch.equal(o, outs[0]) for o in outs)
                        first[f"alone_{name}_equals_run0"] = bool(torch.equal(outs[0], ref[6]))
                    except RuntimeError as exc:
                        first[f"alone_{name}"] = str(exc)[:80]
                break
        found.append(first or {"repeat": repeat, "identical": True, "calls": len(records)})
        print(found[-1], flush=True)
    return found


def first_differences(reference: list, records: list, originals: list, limit: int = 5) -> dict:
    """Compare call by call. For calls whose input is equal but output differs, recompute the
    resident module on that input."""
    out = {"calls": len(records), "input_diffs": 0, "output_diffs_same_input": 0, "first": []}
    for call, ((layer, x_ref, y_ref), (_, x, y)) in enumerate(zip(reference, records)):
        same_in = torch.equal(x_ref, x)
        if not same_in:
            out["input_diffs"] += 1
            continue
        if torch.equal(y_ref, y):
            continue
        out["output_diffs_same_input"] += 1
        if len(out["first"]) < limit:
            with torch.inference_mode():
                again = originals[layer](x)
            out["first"].append({
                "call": call, "layer": layer, "tokens": int(x.numel() // x.shape[-1]),
                "max_abs_diff": float((y.float() - y_ref.float()).abs().max()),
                "differing_elements": int((y != y_ref).sum()),
                "resident_recompute_equals_resident": bool(torch.equal(again, y_ref)),
                "resident_recompute_equals_offloaded": bool(torch.equal(again, y)),
            })
    return out


def verify_slots(offloader, originals: list, mismatches: list) -> None:
    """Wrap offloader.acquire: after it returns, compare the slot with the original expert weights."""
    acquire = offloader.acquire

    def checked(layer: int, expert: int):
        w = acquire(layer, expert)
        ref = originals[layer].experts[expert]
        for name, got, want in (("w1", w.w1, ref.w1.weight), ("w3", w.w3, ref.w3.weight), ("w2", w.w2, ref.w2.weight)):
            torch.cuda.current_stream().synchronize() if got.is_cuda else None
            if not torch.equal(got, want):
                mismatches.append({"layer": layer, "expert": expert, "chunk": name})
        return w

    offloader.acquire = checked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--cache-rate", type=float, default=0.25)
    parser.add_argument("--distances", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--verify-slots", action="store_true", help="also run each path with slot checks")
    parser.add_argument("--localize", type=int, default=0, metavar="RUNS",
                        help="only find the first non-deterministic module of the resident path over RUNS runs")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        shape, device, dtype = SMOKE, torch.device("cpu"), torch.float32
        args.prompt, args.new, args.warmup = 16, 4, 1
    else:
        shape, device, dtype = dataclasses.replace(Shape(), layers=args.layers), torch.device("cuda", 0), torch.bfloat16
    from epdserve.engine.expert_offload import offload_experts

    decoder = build_decoder(shape, device, dtype)
    originals = [layer.feed_forward for layer in decoder.layers]  # kept alive: the resident weights
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape.vocab, (args.prompt,), generator=gen)
    feed = torch.randint(0, shape.vocab, (args.warmup + args.new,), generator=gen)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "layers": shape.layers,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": []}
    if args.localize:
        report["localize"] = localize(decoder, prompt, feed, args.warmup + args.new, args.localize)
        report["localize_sdpa"] = localize_sdpa(decoder, prompt, feed, args.warmup + args.new, args.localize)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        return 0
    reference_run, reference = recorded_run(decoder, prompt, feed, args)
    again_run, again = recorded_run(decoder, prompt, feed, args)
    report["rows"].append({"name": "resident_again",
                           "argmax_match": sum(a == b for a, b in zip(again_run["argmax"], reference_run["argmax"])),
                           **first_differences(reference, again, originals)})
    print(report["rows"][-1], flush=True)
    host = None
    for name, config in offload_cases(args):
        for verify in (False, True) if args.verify_slots else (False,):
            offloader = offload_experts(decoder, config, host=host)
            host = offloader.host
            slot_mismatches: list = []
            if verify:
                verify_slots(offloader, originals, slot_mismatches)
            try:
                run, records = recorded_run(decoder, prompt, feed, args, offloader)
            finally:
                offloader.close()
            row = {"name": name + ("+verify" if verify else ""),
                   "argmax_match": sum(a == b for a, b in zip(run["argmax"], reference_run["argmax"])),
                   "argmax_total": len(run["argmax"]), "slot_mismatches": slot_mismatches[:10],
                   "slot_mismatch_count": len(slot_mismatches), **first_differences(reference, records, originals)}
            report["rows"].append(row)
            print(row, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
