"""Train the tiny long-context retrieval checkpoint from scratch on multi-key associative recall
(`quality.retrieval_data`), the model FastKV's accuracy is measured on.

The result is an ordinary `LlavaForConditionalGeneration` directory (the tiny builder's layout, so
epdserve serves it as is; its small vision tower is never trained or used: prompts are text only,
sent raw). The decoder is Llama-style with GQA (4 query / 2 KV heads), 4 layers, so FastKV's
token-selective propagation has layers before and after its TSP layer. Context lengths are drawn
per batch from --min-context..--max-context; held-out examples (seeds below TRAIN_SEED_BASE) are
scored at --max-context.

    python -m quality.train_retrieval --out DIR [--max-context 256] [--steps 3000]   # CPU: minutes
    python -m quality.train_retrieval --out DIR --max-context 16384 ...               # a GPU

Half of each batch (--repeat-fraction) is repeated random text (`repeat_example`): without it
the recall circuit did not form in 8,000 steps (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import sys

import torch

from epdserve.models.tiny import TinySpec
from quality.retrieval_data import TRAIN_SEED_BASE, example, repeat_example
from quality.training import TrainConfig, add_train_arguments, fit, to_device, train_checkpoint, train_config_from_args

RETRIEVAL_SPEC = TinySpec(backbone="llama", vision="clip", seed=0, hidden_size=128, intermediate_size=384,
                          num_layers=4, num_heads=4, num_kv_heads=2, max_context=16384 + 256, image_size=32,
                          patch_size=16, init_std=0.02, vision_hidden_size=32, vision_intermediate_size=64,
                          vision_layers=1, vision_heads=2,
                          rope_parameters=(("rope_type", "default"), ("rope_theta", 500000.0)))
TRAIN_DEFAULTS = TrainConfig(steps=3000, batch_size=16, lr=1e-3, warmup_steps=200, eval_every=500, eval_examples=200)
TRAIN_QUERIES = 8  # needles, all of them asked, per training sequence (evaluation: 4 needles, 1 asked)


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    min_tokens: int = 64
    max_tokens: int = 256
    repeat_fraction: float = 0.5   # sequences of a batch that are repeated text, not recall


class RetrievalBatcher:
    """Token ids and labels (answer digits only) of retrieval examples, one byte per token after BOS."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, examples, queries_scored: int | None = None) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for e in examples:
            text, spans = e.training_text()
            ids = self.tokenizer(text)["input_ids"]
            if len(ids) != len(text) + 1:
                raise ValueError("the retrieval task needs a byte-level tokenizer with one token per ASCII byte")
            label = [-100] * len(ids)
            for start, end in spans[:queries_scored]:
                label[start + 1:end + 1] = ids[start + 1:end + 1]
            rows.append(ids)
            labels.append(label)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}


@torch.inference_mode()
def exact_match(model, batcher: RetrievalBatcher, seeds, context_tokens: int, batch_size: int = 50) -> float:
    """Fraction of held-out single-query examples whose both answer digits are the argmax given
    the right prefix (what greedy decoding answers)."""
    seeds, hits = list(seeds), 0
    for start in range(0, len(seeds), batch_size):
        batch = to_device(batcher([example(s, context_tokens) for s in seeds[start:start + batch_size]],
                                  queries_scored=1), model.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        hits += int(((predicted == labels) | (labels == -100)).all(dim=1).sum())
    return hits / max(1, len(seeds))


def train(out_dir: pathlib.Path, config: TrainConfig = TRAIN_DEFAULTS, task: RetrievalTask = RetrievalTask(),
          log=print, start_from: pathlib.Path | None = None) -> dict:
    from transformers import AutoTokenizer

    def run(model, init_dir: pathlib.Path) -> list[dict]:
        batcher = RetrievalBatcher(AutoTokenizer.from_pretrained(init_dir))
        return fit(model, _batches(batcher, config, task), config,
                   lambda m: exact_match(m, batcher, range(config.eval_examples), task.max_tokens), log)

    report = {"task": dataclasses.asdict(task), "queries_per_sequence": TRAIN_QUERIES}
    return train_checkpoint(out_dir, RETRIEVAL_SPEC, config, run, report, start_from)


def _batches(batcher: RetrievalBatcher, config: TrainConfig, task: RetrievalTask):
    def make_batch(step: int) -> dict:
        first = TRAIN_SEED_BASE + config.seed * 10_000_000 + step * config.batch_size
        rng = random.Random(first)
        tokens = rng.randint(task.min_tokens, task.max_tokens)  # one length per batch
        return batcher([repeat_example(s, tokens) if rng.random() < task.repeat_fraction
                        else example(s, tokens, queries=TRAIN_QUERIES, needles=TRAIN_QUERIES)
                        for s in range(first, first + config.batch_size)])
    return make_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quality.train_retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--min-context", type=int, default=RetrievalTask.min_tokens)
    parser.add_argument("--max-context", type=int, default=RetrievalTask.max_tokens)
    parser.add_argument("--repeat-fraction", type=float, default=RetrievalTask.repeat_fraction)
    parser.add_argument("--start-from", type=pathlib.Path, default=None,
                        help="a checkpoint of this script to go on training (e.g. at longer contexts)")
    add_train_arguments(parser, TRAIN_DEFAULTS)
    args = parser.parse_args(argv)
    config = train_config_from_args(args)
    report = train(args.out, config, RetrievalTask(args.min_context, args.max_context, args.repeat_fraction),
                   log=lambda line: print(line, flush=True), start_from=args.start_from)
    print(json.dumps(report["history"][-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
