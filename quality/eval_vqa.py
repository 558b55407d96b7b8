"""Accuracy of a visual-QA checkpoint on held-out generated questions, answered by HF
`transformers` (greedy `generate`) or by a running epdserve deployment (greedy, through the
router), with the answers side by side.

    python -m quality.eval_vqa --model DIR [--examples 500]          # transformers
    python -m quality.eval_vqa --router HOST:PORT [--examples 500]   # epdserve
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable

from quality.vqa_data import example

MAX_ANSWER_TOKENS = 10  # the longest answer (" triangle") and its end token


def accuracy(answers: list[str], seeds: Iterable[int]) -> dict[str, float]:
    """Exact-match accuracy (whitespace stripped) per question kind and over all."""
    hits: dict[str, list[bool]] = {}
    for answer, seed in zip(answers, seeds):
        truth = example(seed)
        hits.setdefault(truth.kind, []).append(answer.strip() == truth.answer)
    result = {kind: sum(v) / len(v) for kind, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return result


def hf_answers(model_dir: pathlib.Path, seeds: Iterable[int]) -> list[str]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from quality.train_vqa import Batcher

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    batcher = Batcher(processor)
    answers = []
    with torch.inference_mode():
        for seed in seeds:
            e = example(seed)
            inputs = processor(text=[batcher.prompt(e.question)], images=[e.image], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
            answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def served_answers(client, seeds: Iterable[int], keep_ratio: float = 1.0) -> list[str]:
    """Answers from an epdserve router (`epdserve.sdk.Client`), greedy, keeping `keep_ratio` of
    each image's tokens (1.0: lossless)."""
    answers = []
    for seed in seeds:
        e = example(seed)
        answers.append(client.generate(e.question, images=[e.png()], max_tokens=MAX_ANSWER_TOKENS,
                                       temperature=0.0, image_keep_ratio=keep_ratio).text)
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quality.eval_vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=pathlib.Path, help="checkpoint directory (answered by transformers)")
    where.add_argument("--router", help="router address of a running deployment (answered by epdserve)")
    parser.add_argument("--examples", type=int, default=500, help="held-out questions (seeds 0..N-1)")
    args = parser.parse_args(argv)
    seeds = range(args.examples)
    if args.model is not None:
        answers = hf_answers(args.model, seeds)
    else:
        from epdserve.sdk import Client

        with Client(args.router, timeout_s=60) as client:
            answers = served_answers(client, seeds)
    print(json.dumps({"examples": args.examples, "accuracy": accuracy(answers, seeds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
