"""Train the tiny visual-QA checkpoint from scratch on generated questions (`quality.vqa_data`).

The result is an ordinary `LlavaForConditionalGeneration` directory (the tiny builder's layout:
CLIP-style tower, 2-layer projector, Llama-style GQA decoder, byte-level tokenizer with a chat
template), so `transformers` and epdserve both load it. Training and held-out seeds never
overlap; the same config and seed give the same weights on the same machine.

    python -m quality.train_vqa --out DIR [--steps 4000] [--batch-size 48]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from epdserve.models.tiny import TinySpec
from quality.training import TrainConfig, add_train_arguments, fit, to_device, train_checkpoint, train_config_from_args
from quality.vqa_data import IMAGE_SIZE, TRAIN_SEED_BASE, example

# one 16-pixel patch per grid cell: 9 image tokens, so a CPU trains it in minutes
VQA_SPEC = TinySpec(backbone="llama", vision="clip", seed=0, hidden_size=128, intermediate_size=384, num_layers=3,
                    num_heads=4, num_kv_heads=2, max_context=256, image_size=IMAGE_SIZE, patch_size=16,
                    init_std=0.02, vision_hidden_size=128, vision_intermediate_size=384, vision_layers=3,
                    vision_heads=4)


class Batcher:
    """Token ids, labels (answer tokens only) and pixels for a list of generated examples, built
    exactly as serving builds them: chat template, placeholder expanded by the processor."""

    def __init__(self, processor) -> None:
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.eos = self.tokenizer.eos_token_id

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        prompts = self.processor(text=[self.prompt(e.question) for e in examples], images=[e.image for e in examples],
                                 return_tensors="pt", padding=True)
        rows, labels = [], []
        for ids, mask, e in zip(prompts["input_ids"], prompts["attention_mask"], examples):
            answer = self.tokenizer(" " + e.answer, add_special_tokens=False)["input_ids"] + [self.eos]
            prompt_ids = ids[mask.bool()].tolist()
            rows.append(prompt_ids + answer)
            labels.append([-100] * len(prompt_ids) + answer)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
            "pixel_values": prompts["pixel_values"],
        }


@torch.inference_mode()
def exact_match(model, batcher: Batcher, seeds, batch_size: int = 100) -> dict[str, float]:
    """Fraction of examples whose every answer token (and the end token) is the argmax given the
    right prefix: exactly the examples greedy decoding answers correctly. Per kind and overall."""
    hits: dict[str, list[bool]] = {}
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        examples = [example(s) for s in seeds[start:start + batch_size]]
        batch = to_device(batcher(examples), model.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        scored = labels != -100
        correct = ((predicted == labels) | ~scored).all(dim=1)
        for e, ok in zip(examples, correct.tolist()):
            hits.setdefault(e.kind, []).append(ok)
    result = {kind: sum(v) / len(v) for kind, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / len(seeds)
    return result


def train(out_dir: pathlib.Path, config: TrainConfig = TrainConfig(), log=print,
          start_from: pathlib.Path | None = None) -> dict:
    from transformers import AutoProcessor

    def run(model, init_dir: pathlib.Path) -> list[dict]:
        return _fit(model, Batcher(AutoProcessor.from_pretrained(init_dir)), config, log)

    return train_checkpoint(out_dir, VQA_SPEC, config, run, start_from=start_from)


def _fit(model, batcher: Batcher, config: TrainConfig, log) -> list[dict]:
    def make_batch(step: int) -> dict:
        first = TRAIN_SEED_BASE + (config.seed * 10_000_000) + step * config.batch_size
        return batcher([example(s) for s in range(first, first + config.batch_size)])

    return fit(model, make_batch, config, lambda m: exact_match(m, batcher, range(config.eval_examples)), log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quality.train_vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--start-from", type=pathlib.Path, default=None,
                        help="go on training this checkpoint (saved by this command) instead of fresh weights; "
                             "give another --seed so it sees new examples")
    add_train_arguments(parser, TrainConfig())
    args = parser.parse_args(argv)
    config = train_config_from_args(args)
    report = train(args.out, config, log=lambda line: print(line, flush=True), start_from=args.start_from)
    print(json.dumps(report["history"][-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
