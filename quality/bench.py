"""Accuracy of epdserve's lossy techniques on the shipped visual-QA model, answered through
E -> P -> D (local clusters, greedy) next to the lossless path measured in the same run.

    epdserve bench quality [--examples 500] [--out DIR]      (or python -m quality.bench)

- Vision-token sparsification: exact-match accuracy at each keep ratio for each scorer:
  `cls-attention` (training-free default), `feature-norm`, and `learned` (Dynamic-LLaVA's image
  predictor, trained here on this model with `epdserve sparsify train` on generated training
  pictures, never the held-out ones).
- MOM mini-sequences: prefill with MLP / LM-head chunks of a few tokens gives the same answers as
  the lossless path (compared answer by answer).
- FastKV (with --retrieval-model, a checkpoint from `python -m quality.train_retrieval`): retrieval
  accuracy per context length and tsp_rate = retain_rate setting, next to the lossless path, per
  depth of the answer in the context; rate 1.0 must give the lossless answers exactly.
- Generated-token sparsification (Dynamic-LLaVA decode mode, same --retrieval-model): long answers,
  continuing a copy of a random segment the context holds (`RepeatExample.continuation`), exact
  match and per-byte accuracy at each decode --text-keep-rate; 1.0 is the lossless path.

Invariant: every row is measured on the same held-out questions (seeds 0..N-1) with the same
checkpoint; keep ratio 1.0 is the lossless path for every scorer, so its rows must agree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

from quality.eval_vqa import accuracy, served_answers
from quality.vqa_data import TRAIN_SEED_BASE, example

SCORERS = ("cls-attention", "feature-norm", "learned")
FASTKV_RATES = (1.0, 0.5, 0.2, 0.1)   # tsp_rate = retain_rate
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the answer sits in the context, cycled over the examples
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
TEXT_KEEP_RATES = (1.0, 0.5, 0.25)
COPY_CUE = 8          # bytes of the second copy the prompt already holds
MOM_CHUNK_TOKENS = 4  # VQA prompts are ~30 tokens: 4-token mini-sequences split every one of them


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    examples: int = 500                    # held-out questions (seeds 0..N-1)
    scorers: tuple[str, ...] = SCORERS
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    predictor_samples: int = 400           # generated training pictures for `epdserve sparsify train`
    predictor_steps: int = 2000
    mom: bool = True
    retrieval_model: pathlib.Path | None = None
    fastkv_contexts: tuple[int, ...] = (64, 128, 256)
    fastkv_rates: tuple[float, ...] = FASTKV_RATES
    fastkv_tsp_layer: int = -1             # prefill --fastkv-tsp-layer (-1: the service's default)
    fastkv_head_selection: str = "group"   # prefill --fastkv-head-selection (group = GQA-aware)
    retrieval_examples: int = 200
    text_keep_rates: tuple[float, ...] = TEXT_KEEP_RATES
    copy_context: int = 1024               # tokens of the long-answer prompts
    copy_segment: int = 96                 # bytes copied: the answer is copy_segment - COPY_CUE long
    device: str = "cpu"                    # where the local clusters serve ("cuda" on a GPU machine)


def run_quality_bench(model_dir: pathlib.Path, config: QualityConfig, workdir: pathlib.Path,
                      progress=print) -> dict:
    """Every measurement of this module on `model_dir`; returns the JSON-able result."""
    from epdserve.models.spec import load_spec

    seeds = range(config.examples)
    result: dict = {"model": str(model_dir), "examples": config.examples,
                    "tokens_per_image": load_spec(model_dir).tokens_per_image, "sparsification": [], "mom": None}
    lossless: list[str] | None = None
    for scorer in config.scorers:
        encode_args = ("--scorer", scorer)
        if scorer == "learned":
            predictor = workdir / "image-predictor.safetensors"
            result["predictor"] = train_image_predictor(model_dir, workdir, config, predictor)
            progress(f"learned predictor: {result['predictor']}")
            encode_args += ("--predictor-path", str(predictor))
        with served_model(model_dir, {"encode": encode_args}, config.device) as client:
            for keep in config.keep_ratios:
                start = time.perf_counter()
                answers = served_answers(client, seeds, keep_ratio=keep)
                row = {"scorer": scorer, "keep_ratio": keep, "accuracy": accuracy(answers, seeds),
                       "seconds": round(time.perf_counter() - start, 1)}
                if keep == 1.0:
                    lossless = lossless or answers
                    row["same_answers_as_lossless"] = _agreement(answers, lossless)
                result["sparsification"].append(row)
                progress(f"{scorer:>13} keep {keep:<4} accuracy {row['accuracy']['all']:.3f}")
    if config.mom:
        result["mom"] = _mom_rows(model_dir, seeds, lossless, config.device)
        progress(f"MOM: {result['mom']}")
    if config.retrieval_model is not None:
        result["fastkv_tsp_layer"] = config.fastkv_tsp_layer
        result["fastkv_head_selection"] = config.fastkv_head_selection
        result["fastkv"] = fastkv_rows(config.retrieval_model, config, progress)
        result["generated_sparsification"] = generated_sparsification_rows(config.retrieval_model, config, progress)
    return result


def fastkv_rows(model_dir: pathlib.Path, config: QualityConfig, progress=print) -> list[dict]:
    """Served accuracy per context length, lossless then each FastKV rate: needle retrieval (a
    one-token answer: what TSP keeps decides it) and copy continuation (a long answer: the KV each
    layer retains decides it)."""
    from quality.retrieval_data import example as retrieval_example

    rows = []
    prefill_args = ("--fastkv-head-selection", config.fastkv_head_selection)
    if config.fastkv_tsp_layer >= 0:
        prefill_args += ("--fastkv-tsp-layer", str(config.fastkv_tsp_layer))
    with served_model(model_dir, {"prefill": prefill_args}, config.device) as client:
        for tokens in config.fastkv_contexts:
            examples = [retrieval_example(seed, tokens, depth=DEPTHS[seed % len(DEPTHS)])
                        for seed in range(config.retrieval_examples)]
            copies = _copy_tasks(config, tokens)
            lossless = _retrieval_answers(client, examples, None), _copy_answers(client, copies, None)
            rows.append(base := _retrieval_row(tokens, None, examples, copies, lossless, lossless))
            for rate in config.fastkv_rates:
                fastkv = {"tsp_rate": rate, "retain_rate": rate}
                answers = _retrieval_answers(client, examples, fastkv), _copy_answers(client, copies, fastkv)
                rows.append(_retrieval_row(tokens, rate, examples, copies, answers, lossless))
                progress(f"FastKV {tokens} tokens, rate {rate}: retrieval {rows[-1]['accuracy']:.3f} "
                         f"(lossless {base['accuracy']:.3f}), copy bytes {rows[-1]['copy']['byte_accuracy']:.3f} "
                         f"(lossless {base['copy']['byte_accuracy']:.3f})")
    return rows


def generated_sparsification_rows(model_dir: pathlib.Path, config: QualityConfig, progress=print) -> list[dict]:
    """Long answers (copy continuations) per decode text keep rate, next to keep 1.0 (lossless)."""
    tasks = _copy_tasks(config, config.copy_context)
    rows, lossless = [], None
    rates = (1.0, *(r for r in config.text_keep_rates if r != 1.0)) if config.text_keep_rates else ()
    for rate in rates:   # keep 1.0 first: the lossless answers every other rate is compared with
        with served_model(model_dir, {"decode": ("--text-keep-rate", str(rate))}, config.device) as client:
            answers = _copy_answers(client, tasks, None)
        lossless = lossless or answers
        rows.append({"text_keep_rate": rate, **_copy_scores(tasks, answers, lossless)})
        progress(f"generated-token keep {rate}: exact {rows[-1]['exact_match']:.3f}, "
                 f"bytes {rows[-1]['byte_accuracy']:.3f}")
    return rows


def _copy_tasks(config: QualityConfig, tokens: int) -> list[tuple[str, str]]:
    from quality.retrieval_data import repeat_example

    return [repeat_example(seed, tokens, segment=config.copy_segment).continuation(COPY_CUE)
            for seed in range(config.retrieval_examples)]


def _copy_answers(client, tasks: list[tuple[str, str]], fastkv) -> list[str]:
    return [client.generate(prompt, raw=True, max_tokens=len(answer), temperature=0.0, ignore_eos=True,
                            fastkv=fastkv).text for prompt, answer in tasks]


def _copy_scores(tasks: list[tuple[str, str]], answers: list[str], lossless: list[str]) -> dict:
    return {"answer_bytes": len(tasks[0][1]) if tasks else 0,
            "exact_match": _mean(a == answer for a, (_, answer) in zip(answers, tasks)),
            "byte_accuracy": _mean(_byte_accuracy(a, answer) for a, (_, answer) in zip(answers, tasks)),
            "same_answers_as_lossless": _agreement(answers, lossless)}


def _byte_accuracy(answer: str, reference: str) -> float:
    return sum(a == b for a, b in zip(answer, reference)) / max(1, len(reference))


def _retrieval_answers(client, examples, fastkv) -> list[str]:
    return [client.generate(e.prompt(), raw=True, max_tokens=len(e.answer), temperature=0.0, ignore_eos=True,
                            fastkv=fastkv).text for e in examples]


def _retrieval_row(tokens: int, rate: float | None, examples, copies, answers: tuple[list[str], list[str]],
                   lossless: tuple[list[str], list[str]]) -> dict:
    hits = [a == e.answer for a, e in zip(answers[0], examples)]
    by_depth = {f"{d:g}": _mean([h for h, e in zip(hits, examples) if e.depths[0] == d]) for d in DEPTHS}
    return {"context_tokens": tokens, "fastkv_rate": rate, "accuracy": _mean(hits), "by_depth": by_depth,
            "same_answers_as_lossless": _agreement(answers[0], lossless[0]),
            "copy": _copy_scores(copies, answers[1], lossless[1])}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def train_image_predictor(model_dir: pathlib.Path, workdir: pathlib.Path, config: QualityConfig,
                          out: pathlib.Path) -> dict:
    """`epdserve sparsify train` on generated training pictures, each paired with its own question
    (files sort in the order of the prompts file). Returns the training report."""
    from epdserve.cli import main as epdserve_main

    images, prompts = workdir / "predictor-images", workdir / "predictor-prompts.txt"
    images.mkdir(parents=True, exist_ok=True)
    questions = []
    for i in range(config.predictor_samples):
        e = example(TRAIN_SEED_BASE + 500_000 + i)
        e.image.save(images / f"{i:06d}.png")
        questions.append(e.question)
    prompts.write_text("\n".join(questions) + "\n")
    argv = ["sparsify", "train", "--model", str(model_dir), "--images", str(images), "--prompts", str(prompts),
            "--out", str(out), "--steps", str(config.predictor_steps)]
    if epdserve_main(argv) != 0:
        raise RuntimeError("epdserve sparsify train failed")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        return json.loads(f.metadata()["report"])


def _mom_rows(model_dir: pathlib.Path, seeds, lossless: list[str] | None, device: str) -> dict:
    chunks = ("--chunk-tokens", str(MOM_CHUNK_TOKENS), "--min-chunk-tokens", str(MOM_CHUNK_TOKENS),
              "--no-last-position-only")
    with served_model(model_dir, {"prefill": chunks}, device) as client:
        answers = served_answers(client, seeds)
    if lossless is None:
        with served_model(model_dir, {}, device) as client:
            lossless = served_answers(client, seeds)
    return {"chunk_tokens": MOM_CHUNK_TOKENS, "accuracy": accuracy(answers, seeds),
            "lossless_accuracy": accuracy(lossless, seeds), "same_answers_as_lossless": _agreement(answers, lossless)}


def _agreement(answers: list[str], reference: list[str]) -> float:
    return sum(a == b for a, b in zip(answers, reference)) / max(1, len(reference))


@contextlib.contextmanager
def served_model(model_dir: pathlib.Path, stage_args: dict[str, tuple[str, ...]], device: str = "cpu"):
    """A client of a local E -> P -> D cluster of `model_dir` on `device`, run with extra per-stage flags."""
    from epdserve.launcher import ClusterConfig, LocalCluster
    from epdserve.sdk import Client

    with (LocalCluster(ClusterConfig(model_dir=model_dir, device=device, stage_args=stage_args)) as cluster,
          Client(cluster.router_address, timeout_s=120) as client):
        yield client


def markdown_table(result: dict) -> str:
    from epdserve.models.spec import kept_tokens

    lines: list[str] = []
    if result["sparsification"]:
        kinds = sorted(next(iter(result["sparsification"]))["accuracy"])
        kinds = [k for k in kinds if k != "all"] + ["all"]
        lines += ["| scorer | keep ratio | image tokens kept | " + " | ".join(kinds) + " |",
                  "|---|---:|---:|" + "---:|" * len(kinds)]
        for row in result["sparsification"]:
            kept = kept_tokens(result["tokens_per_image"], row["keep_ratio"])
            cells = " | ".join(f"{row['accuracy'][k]:.3f}" for k in kinds)
            lines.append(f"| {row['scorer']} | {row['keep_ratio']} | {kept} | {cells} |")
    if result.get("fastkv"):
        depths = list(result["fastkv"][0]["by_depth"])
        copy_bytes = result["fastkv"][0]["copy"]["answer_bytes"]
        lines += ["", "| context tokens | FastKV rate (tsp = retain) | retrieval accuracy | same answers as lossless | "
                  + " | ".join(f"depth {d}" for d in depths) + f" | copy exact ({copy_bytes} bytes) | copy bytes |",
                  "|---:|---|---:|---:|" + "---:|" * len(depths) + "---:|---:|"]
        for row in result["fastkv"]:
            rate = "lossless" if row["fastkv_rate"] is None else f"{row['fastkv_rate']:g}"
            cells = " | ".join(f"{row['by_depth'][d]:.2f}" for d in depths)
            lines.append(f"| {row['context_tokens']} | {rate} | {row['accuracy']:.3f} | "
                         f"{row['same_answers_as_lossless']:.1%} | {cells} | {row['copy']['exact_match']:.3f} | "
                         f"{row['copy']['byte_accuracy']:.3f} |")
    if result.get("generated_sparsification"):
        rows = result["generated_sparsification"]
        lines += ["", f"| decode text keep rate | exact match ({rows[0]['answer_bytes']}-byte answers) | byte accuracy "
                  "| same answers as keep 1.0 |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['text_keep_rate']:g} | {r['exact_match']:.3f} | {r['byte_accuracy']:.3f} | "
                  f"{r['same_answers_as_lossless']:.1%} |" for r in rows]
    mom = result.get("mom")
    if mom:
        lines += ["", f"MOM (prefill mini-sequences of {mom['chunk_tokens']} tokens): accuracy "
                      f"{mom['accuracy']['all']:.3f} vs lossless {mom['lossless_accuracy']['all']:.3f}; "
                      f"same answer on {mom['same_answers_as_lossless']:.1%} of questions"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="epdserve bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=pathlib.Path, default=None, help="default: the shipped visual-QA model")
    parser.add_argument("--examples", type=int, default=QualityConfig.examples)
    parser.add_argument("--scorers", nargs="*", choices=SCORERS, default=list(SCORERS),
                        help="sparsification scorers to measure (none: skip sparsification)")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=list(KEEP_RATIOS))
    parser.add_argument("--predictor-steps", type=int, default=QualityConfig.predictor_steps)
    parser.add_argument("--predictor-samples", type=int, default=QualityConfig.predictor_samples)
    parser.add_argument("--no-mom", action="store_true", help="skip the MOM comparison")
    parser.add_argument("--retrieval-model", type=pathlib.Path, default=None,
                        help="a checkpoint from `python -m quality.train_retrieval`: also measure FastKV on it")
    parser.add_argument("--fastkv-contexts", type=int, nargs="+", default=list(QualityConfig.fastkv_contexts))
    parser.add_argument("--fastkv-rates", type=float, nargs="+", default=list(FASTKV_RATES))
    parser.add_argument("--fastkv-tsp-layer", type=int, default=QualityConfig.fastkv_tsp_layer,
                        help="the layer whose attention selects the tokens that go on (default: the service's)")
    parser.add_argument("--fastkv-head-selection", choices=("group", "per-head"),
                        default=QualityConfig.fastkv_head_selection,
                        help="GQA-aware selection (group) or the per-head-then-summed ablation")
    parser.add_argument("--retrieval-examples", type=int, default=QualityConfig.retrieval_examples)
    parser.add_argument("--text-keep-rates", type=float, nargs="*", default=list(TEXT_KEEP_RATES),
                        help="decode --text-keep-rate values for the long-answer rows (with --retrieval-model; "
                             "none: skip them)")
    parser.add_argument("--copy-context", type=int, default=QualityConfig.copy_context)
    parser.add_argument("--device", default=QualityConfig.device, help="where the local clusters serve: cpu | cuda")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write quality.json and quality.md here")


def run(args: argparse.Namespace) -> int:
    from epdserve.models.tiny import shipped_vqa_checkpoint

    model_dir = args.model or shipped_vqa_checkpoint()
    if model_dir is None:
        raise SystemExit("no --model and the shipped visual-QA model is missing")
    config = QualityConfig(examples=args.examples, scorers=tuple(args.scorers), keep_ratios=tuple(args.keep_ratios),
                           predictor_samples=args.predictor_samples, predictor_steps=args.predictor_steps,
                           mom=not args.no_mom, retrieval_model=args.retrieval_model,
                           fastkv_contexts=tuple(args.fastkv_contexts), fastkv_rates=tuple(args.fastkv_rates),
                           fastkv_tsp_layer=args.fastkv_tsp_layer, fastkv_head_selection=args.fastkv_head_selection,
                           retrieval_examples=args.retrieval_examples, text_keep_rates=tuple(args.text_keep_rates),
                           copy_context=args.copy_context, device=args.device)
    with tempfile.TemporaryDirectory(prefix="epdserve-quality-") as workdir:
        result = run_quality_bench(pathlib.Path(model_dir), config, pathlib.Path(workdir),
                                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    table = markdown_table(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps(result, indent=1))
        (args.out / "quality.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
