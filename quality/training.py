"""The training loop the quality models share: AdamW (weight decay on matrices only), linear
warm-up then cosine decay to 5% of the peak rate, gradient clipping at 1, a held-out evaluation
every `eval_every` steps recorded as the learning curve. On a GPU (`device`), batches are built on
the CPU one step ahead of the model, forward passes run in bf16 autocast (weights and optimizer
state float32), and the weights come back to the CPU when training ends.

Invariant: the loop draws nothing random itself; `make_batch(step)` decides every batch from the
step number, so a config and seed give the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 9000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 500
    eval_examples: int = 400
    device: str = "cpu"          # where the model trains ("cuda" on a GPU machine)
    data_workers: int = 0        # processes building batches (0: one thread, a step ahead)


def train_checkpoint(out_dir: pathlib.Path, spec, config: TrainConfig,
                     run: Callable[[torch.nn.Module, pathlib.Path], list[dict]], report: dict | None = None,
                     start_from: pathlib.Path | None = None) -> dict:
    """Build the tiny LLaVA-layout checkpoint of `spec` (a TinySpec) with fresh weights, or load
    `start_from` (a checkpoint this function saved: training goes on from it), train it with
    `run(model, init_dir)` (returns the learning curve; init_dir holds the tokenizer and processor),
    save it to `out_dir` with those files and `training.json` (spec, config, curve, parameter count,
    plus `report`; a continued run also keeps the earlier runs' records). Returns that report."""
    from transformers import LlavaForConditionalGeneration

    from epdserve.models.tiny import build_tiny_checkpoint

    if start_from is not None and start_from.resolve() == out_dir.resolve():
        raise ValueError(f"--out must differ from --start-from ({out_dir}): the checkpoint is read while training")
    torch.manual_seed(config.seed)
    staging = pathlib.Path(tempfile.mkdtemp(prefix="quality-init-"))
    try:
        init = start_from or build_tiny_checkpoint(staging / "init", spec)
        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        history = run(model, init)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        for path in init.iterdir():
            if not path.name.startswith(("model", "config.json", "training.json")):
                shutil.copy2(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"spec": dataclasses.asdict(spec), "train": dataclasses.asdict(config), **(report or {}),
              "history": history, "parameters": sum(p.numel() for p in model.parameters())}
    if start_from is not None:
        earlier = json.loads((start_from / "training.json").read_text())
        result["spec"] = earlier["spec"]   # the weights' shape is the first run's, whatever `spec` says now
        result["earlier_runs"] = [*earlier.pop("earlier_runs", []), earlier]
    (out_dir / "training.json").write_text(json.dumps(result, indent=2))
    return result


def fit(model: torch.nn.Module, make_batch: Callable[[int], dict], config: TrainConfig,
        evaluate: Callable[[torch.nn.Module], dict], log: Callable[[str], None] = print) -> list[dict]:
    """Train `model` in place for config.steps steps on `make_batch(step)` (keyword arguments of the
    model's forward, labels included); returns the learning curve (step, loss, evaluation, seconds)."""
    model.to(config.device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    history, started = [], time.perf_counter()
    batches = _WorkerBatches(make_batch, config) if config.data_workers else _PrefetchedBatches(make_batch, config)
    try:
        for step in range(1, config.steps + 1):
            evaluating = step % config.eval_every == 0 or step == config.steps
            batch = to_device(batches.take(step, evaluating), config.device)
            with _autocast(config.device):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if evaluating:
                model.eval()
                with _autocast(config.device):
                    accuracy = evaluate(model)
                model.train()
                elapsed = time.perf_counter() - started
                history.append({"step": step, "loss": loss.item(), "accuracy": accuracy, "elapsed_s": elapsed})
                log(f"step {step}: loss {loss.item():.3f}, held-out exact match {accuracy}, {elapsed:.0f} s")
                batches.resume(step)
    finally:
        batches.close()
    model.to("cpu").eval()
    return history


class _PrefetchedBatches:
    """make_batch(step) for steps 1, 2, ... built one step ahead on a thread, except across an
    evaluation (it uses the same tokenizer, which is not thread-safe): `take(step, pausing=True)`
    builds nothing meanwhile, `resume(step)` starts the next one."""

    def __init__(self, make_batch: Callable[[int], dict], config: TrainConfig) -> None:
        self._make, self._last = make_batch, config.steps
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batches")
        self._upcoming = self._pool.submit(make_batch, 1)

    def take(self, step: int, pausing: bool) -> dict:
        batch = self._upcoming.result()
        if not pausing:
            self.resume(step)
        return batch

    def resume(self, step: int) -> None:
        if step < self._last:
            self._upcoming = self._pool.submit(self._make, step + 1)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class _StepBatches(torch.utils.data.Dataset):
    def __init__(self, make_batch: Callable[[int], dict], steps: int) -> None:
        self.make_batch, self.steps = make_batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        return self.make_batch(index + 1)


class _WorkerBatches:
    """make_batch(step) for steps 1, 2, ... built by `config.data_workers` forked processes
    (torch's DataLoader, batches in step order): the batch builder's Python no longer shares the
    training loop's GIL. Each process has its own tokenizer, so evaluation need not pause them."""

    def __init__(self, make_batch: Callable[[int], dict], config: TrainConfig) -> None:
        self._loader = torch.utils.data.DataLoader(
            _StepBatches(make_batch, config.steps), batch_size=None, shuffle=False,
            num_workers=config.data_workers, prefetch_factor=4, multiprocessing_context="fork")
        self._batches = iter(self._loader)

    def take(self, step: int, pausing: bool) -> dict:
        return next(self._batches)

    def resume(self, step: int) -> None:
        pass

    def close(self) -> None:
        self._batches = None  # the loader's iterator stops its processes when it goes away


def _autocast(device: str):
    """bf16 mixed precision on a GPU (weights and optimizer state stay float32); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: str | torch.device) -> dict:
    """A batch's tensors moved to `device` (the model's)."""
    return {name: value.to(device) for name, value in batch.items()}


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def add_train_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """--steps, --batch-size, ... with `defaults`, plus --threads."""
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.threads:
        torch.set_num_threads(args.threads)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
