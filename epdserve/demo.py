"""`epdserve demo`: one image + text request through a freshly started local cluster,
streamed to the terminal with the per-stage latency breakdown."""

from __future__ import annotations

import io
import json
import pathlib
import sys
import time
from typing import TextIO

from epdserve.config import TraceConfig
from epdserve.launcher import ClusterConfig, LocalCluster

DEMO_PROMPT = "What is in this picture?"
DEMO_QUESTION_SEED = 14  # a held-out generated question (the VQA model never trained on seeds below 1,000,000)

# (label, timings key) rows of the breakdown, in pipeline order.
BREAKDOWN = (
    ("encode: image decode", "encode.decode_ms"),
    ("encode: cache lookup", "encode.cache_lookup_ms"),
    ("encode: vision tower + projector", "encode.encode_ms"),
    ("encode: cache put", "encode.cache_put_ms"),
    ("encode: RPC (router view)", "encode_rpc_ms"),
    ("prefill: cache get (embeddings)", "prefill.cache_get_ms"),
    ("prefill: forward", "prefill.prefill_ms"),
    ("prefill: KV publish (after compute)", "prefill.kv_publish_ms"),
    ("prefill: RPC (router view)", "prefill_rpc_ms"),
    ("decode: KV fetch", "decode.kv_fetch_ms"),
    ("KV hand-off (publish + fetch)", "kv_handoff_ms"),
    ("TTFT", "ttft_ms"),
    ("decode: per token (TPOT)", "tpot_ms"),
    ("total", "total_ms"),
)


def demo_image_png(size: int = 96) -> bytes:
    """A deterministic picture: a red disc and a blue square on a light background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, size // 2, size // 2), fill=(200, 30, 30))
    draw.rectangle((size // 2, size // 2, size - 8, size - 8), fill=(30, 60, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_demo(model_dir: pathlib.Path, *, prompt: str | None = None, image: bytes | None = None,
             max_tokens: int = 24, as_json: bool = False, out: TextIO = sys.stdout,
             trace: TraceConfig = TraceConfig(), token: str = "") -> int:
    """With neither `prompt` nor `image`: a generated picture and its question, with the expected
    answer printed next to the model's (the shipped VQA model answers it; a random model cannot)."""
    from epdserve.sdk import Client

    expected = None
    if prompt is None and image is None:
        prompt, image, expected = demo_question()
    prompt = prompt or DEMO_PROMPT
    image = image if image is not None else demo_image_png()
    started = time.perf_counter()
    cluster = LocalCluster(ClusterConfig(model_dir=model_dir, trace=trace))
    try:
        address = cluster.start()
        startup_s = time.perf_counter() - started
        if not as_json:
            print(f"cluster up in {startup_s:.1f} s: router {address}, redis {cluster.redis_url}", file=out)
            if expected is not None:
                print(f"picture: {_saved(image)}", file=out)
            print(f"prompt: {prompt!r} + one {len(image)}-byte PNG\nanswer: ", end="", file=out, flush=True)
        with Client(address, timeout_s=120, token=token) as client:
            stream = client.stream(prompt, images=[image], max_tokens=max_tokens, temperature=0.0)
            for chunk in stream:
                if not as_json:
                    print(chunk.text, end="", file=out, flush=True)
            result = stream.result
    finally:
        codes = cluster.stop()
    _report(result, codes, startup_s, as_json, out, expected)
    return 0 if all(code == 0 for code in codes.values()) else 1


def _saved(png: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="epdserve-demo-", suffix=".png", delete=False) as f:
        f.write(png)
    return f.name


def demo_question() -> tuple[str, bytes, str]:
    """(question, PNG bytes, expected answer) of the demo's generated picture."""
    from quality.vqa_data import example

    e = example(DEMO_QUESTION_SEED)
    return e.question, e.png(), e.answer


def _report(result, codes: dict, startup_s: float, as_json: bool, out: TextIO, expected: str | None) -> None:
    if as_json:
        payload = {"text": result.text, "token_ids": list(result.token_ids), "finish_reason": result.finish_reason,
                   "usage": vars(result.usage), "timings_ms": result.timings_ms, "startup_s": startup_s,
                   "exit_codes": codes, "expected": expected}
        print(json.dumps(payload), file=out)
        return
    u = result.usage
    print(f"\n\nfinish: {result.finish_reason}; tokens: prompt {u.prompt_tokens} (image {u.image_tokens}), "
          f"generated {u.completion_tokens}", file=out)
    print("per-stage timings (ms):", file=out)
    for label, key in BREAKDOWN:
        if key in result.timings_ms:
            print(f"  {label:<34} {result.timings_ms[key]:9.2f}", file=out)
    print("services stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items()), file=out)
    if expected is not None:
        verdict = "correct" if result.text.strip() == expected else "WRONG"
        print(f"expected answer: {expected!r} ({verdict})", file=out)
