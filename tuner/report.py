"""What `tuner optimize` writes: the ranked table (terminal), and in the output directory
`values.yaml` (a Helm values overlay for deploy/helm/epdserve), `candidates.json` (what `tuner
validate --candidate K` reads), `trials.csv`, `report.md` and its PNG plots."""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Sequence

from tuner.optimize import Scored, Slo, StudyOutcome, candidate_params
from tuner.sim import Candidate


def _ms(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1000:.0f}" if seconds >= 0.01 else f"{seconds * 1000:.1f}"


def _with_band(scored: Scored, key: str) -> str:
    value = scored.metrics.get(key, math.inf)
    band = scored.spread.get(key)
    return _ms(value) + (f"±{_ms(band)}" if band is not None and math.isfinite(value) else "")


def settings_text(c: Candidate) -> str:
    parts = ["E in P"] if c.encode_colocated else []
    parts += [f"batch {c.encode_max_batch}/{c.encode_max_wait_ms:g}ms", f"run {c.decode_max_running}"]
    if c.image_keep_ratio < 1:
        parts.append(f"keep {c.image_keep_ratio:g}")
    if c.fastkv:
        parts.append("FastKV")
    if c.local_prefill_tokens:
        parts.append(f"E->PD <= {c.local_prefill_tokens}")
    return ", ".join(parts)


TABLE_HEADER = ("#", "E/P/D", "settings", "cost", "TTFT p50/p90/p99 ms", "TPOT p50/p90 ms", "e2e p90 ms",
                "min slack", "bottleneck", "headroom")


def table_rows(ranked: Sequence[Scored]) -> list[tuple[str, ...]]:
    rows = []
    for i, s in enumerate(ranked, 1):
        c = s.candidate
        rows.append((
            str(i), f"{c.encode_replicas}/{c.prefill_replicas}/{c.decode_replicas}", settings_text(c), f"{s.cost:g}",
            "/".join(_with_band(s, f"ttft_p{q}") for q in (50, 90, 99)),
            "/".join(_with_band(s, f"tpot_p{q}") for q in (50, 90)),
            _with_band(s, "e2e_p90"), f"{min(s.slack.values()):+.0%}", s.bottleneck,
            f"{s.headroom:.2f}x" if math.isfinite(s.headroom) else "-"))
    return rows


def print_table(ranked: Sequence[Scored], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="candidates (cheapest first; ± = half-range over 5 noise seeds)")
    for name in TABLE_HEADER:
        table.add_column(name, justify="right" if name not in ("settings", "bottleneck") else "left")
    for row in table_rows(ranked):
        table.add_row(*row)
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=200)  # a pipe or a log: never wrap the numbers
    console.print(table)


def helm_values(candidate: Candidate, *, gpus_per_replica: Sequence[int] = (1, 1, 1), header: str = "") -> str:
    """A values overlay: replicas, GPUs and the flags the candidate sets, per stage. encode.colocated
    is always set (it decides the layout over whatever the values under it say); a colocated
    candidate's encode flags go to the prefill pods and it sets no encode replicas or GPUs."""
    import yaml

    encode = {"colocated": candidate.encode_colocated}
    if not candidate.encode_colocated:
        encode |= {"replicas": candidate.encode_replicas, "gpus": gpus_per_replica[0]}
    encode["args"] = ["--max-batch-size", str(candidate.encode_max_batch),
                      "--max-batch-wait-ms", f"{candidate.encode_max_wait_ms:g}"]
    values = {
        "encode": encode,
        "prefill": {"replicas": candidate.prefill_replicas, "gpus": gpus_per_replica[1],
                    "args": ([] if candidate.prefix_cache else ["--no-prefix-cache"])
                    + (["--fastkv"] if candidate.fastkv else [])},
        "decode": {"replicas": candidate.decode_replicas, "gpus": gpus_per_replica[2],
                   "args": ["--max-running", str(candidate.decode_max_running)]},
    }
    router = (["--image-keep-ratio", f"{candidate.image_keep_ratio:g}"] if candidate.image_keep_ratio < 1 else []) + (
        ["--local-prefill-tokens", str(candidate.local_prefill_tokens)] if candidate.local_prefill_tokens else [])
    if router:
        values["router"] = {"args": router}
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def write_outputs(out: pathlib.Path, outcome: StudyOutcome, slos: Sequence[Slo], *, context: dict,
                  gpus_per_replica: Sequence[int] = (1, 1, 1),
                  best_latencies: dict[str, Sequence[float]] | None = None) -> list[pathlib.Path]:
    """Every artifact; `best_latencies` (metric -> simulated seconds of candidate 1) adds the CDF plot."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_trials(out / "trials.csv", outcome), _write_candidates(out / "candidates.json", outcome, context)]
    if outcome.ranked:
        best = outcome.ranked[0]
        header = (f"epdserve tuner: candidate 1 of {len(outcome.ranked)} for {', '.join(s.label() for s in slos)}\n"
                  f"predicted on profile {context.get('profile', '?')}, trace {context.get('trace', '?')}\n"
                  f"helm install epdserve deploy/helm/epdserve -f <your values> -f values.yaml")
        path = out / "values.yaml"
        path.write_text(helm_values(best.candidate, gpus_per_replica=gpus_per_replica, header=header))
        written.append(path)
    written += _plots(out, outcome)
    if outcome.ranked and best_latencies:
        written.append(write_cdf_plot(out / "latency_cdf.png", best_latencies,
                                      f"candidate 1 ({outcome.ranked[0].candidate.label()}): simulated latency CDFs"))
    written.append(_write_report(out / "report.md", outcome, slos, context, [p.name for p in written]))
    return written


def _write_trials(path: pathlib.Path, outcome: StudyOutcome) -> pathlib.Path:
    trials = outcome.study.trials
    metric_keys = sorted({k for t in trials for k in t.user_attrs.get("metrics", {})})
    constraint_keys = sorted({k for t in trials for k in (t.constraints or {})})
    param_keys = list(candidate_params(Candidate()))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "cost", *param_keys, *metric_keys,
                         *(f"constraint[{k}]" for k in constraint_keys), "bottleneck", "prefiltered"])
        for t in trials:
            metrics = t.user_attrs.get("metrics", {})
            writer.writerow([t.number, t.state.name, t.user_attrs.get("cost", ""),
                             *(t.params.get(k, "") for k in param_keys),
                             *("" if metrics.get(k) is None else metrics[k] for k in metric_keys),
                             *((t.constraints or {}).get(k, "") for k in constraint_keys),
                             t.user_attrs.get("bottleneck", ""), t.user_attrs.get("prefiltered", "")])
    return path


def _scored_json(s: Scored) -> dict:
    finite = lambda d: {k: (v if math.isfinite(v) else None) for k, v in d.items()}  # noqa: E731
    return {"candidate": candidate_params(s.candidate), "label": s.candidate.label(), "cost": s.cost,
            "metrics_s": finite(s.metrics), "spread_s": finite(s.spread), "slack": s.slack,
            "bottleneck": s.bottleneck, "utilization": s.utilization,
            "headroom": s.headroom if math.isfinite(s.headroom) else None}


def _write_candidates(path: pathlib.Path, outcome: StudyOutcome, context: dict) -> pathlib.Path:
    path.write_text(json.dumps({"context": context, "feasible": bool(outcome.ranked),
                                "candidates": [_scored_json(s) for s in outcome.ranked or outcome.closest]},
                               indent=1) + "\n")
    return path


def load_candidate(path: pathlib.Path, rank: int) -> tuple[Candidate, dict]:
    """Candidate `rank` (1-based) of a `candidates.json` and its predicted metrics."""
    data = json.loads(path.read_text())
    candidates = data["candidates"]
    if not 1 <= rank <= len(candidates):
        raise ValueError(f"--candidate {rank}: {path} has candidates 1..{len(candidates)}")
    entry = candidates[rank - 1]
    return Candidate(**entry["candidate"]), entry


def _plots(out: pathlib.Path, outcome: StudyOutcome) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    points = [(t.user_attrs.get("cost"), (t.user_attrs.get("metrics") or {}).get("ttft_p90"),
               all(v <= 0 for v in (t.constraints or {}).values()))
              for t in outcome.study.trials if t.state.name == "COMPLETE"]
    points = [(c, v, ok) for c, v, ok in points if c is not None and v is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for ok, color, label in ((True, "tab:green", "meets every SLO"), (False, "tab:red", "misses an SLO")):
            chosen = [(c, v) for c, v, good in points if good == ok]
            if chosen:
                ax.scatter([c for c, _ in chosen], [v * 1000 for _, v in chosen], s=14, c=color, label=label)
        ax.set_xlabel("cost (GPUs or $/h)")
        ax.set_ylabel("predicted TTFT p90 (ms)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("trials: cost vs predicted TTFT p90")
        fig.tight_layout()
        path = out / "pareto.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_cdf_plot(path: pathlib.Path, curves: dict[str, Sequence[float]], title: str) -> pathlib.Path:
    """Empirical CDFs (ms) of named samples on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        data = np.sort(np.array([v for v in values if v is not None and math.isfinite(v)])) * 1000
        if len(data):
            ax.plot(data, np.arange(1, len(data) + 1) / len(data), label=name)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_report(path: pathlib.Path, outcome: StudyOutcome, slos: Sequence[Slo], context: dict,
                  files: Sequence[str]) -> pathlib.Path:
    lines = ["# epdserve tuner report", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += [f"- SLOs: {', '.join(s.label() for s in slos)}", f"- trials: {len(outcome.study.trials)}"
              + (" (interrupted: partial results)" if outcome.interrupted else ""), ""]
    if outcome.ranked:
        lines += ["## Candidates (cheapest first)", "", "| " + " | ".join(TABLE_HEADER) + " |",
                  "|" + "---|" * len(TABLE_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(outcome.ranked)]
        lines += ["", "Predictions are from the simulator on the profile above; `tuner validate --candidate K` "
                  "replays the trace against a live deployment and labels a candidate verified only within its "
                  "measured error.", ""]
    else:
        lines += ["## No candidate met every SLO", "", "Closest:", ""]
        lines += [f"- {s.candidate.label()} ({settings_text(s.candidate)}): "
                  + ", ".join(f"{k} slack {v:+.0%}" for k, v in s.slack.items()) for s in outcome.closest]
        lines.append("")
    lines += ["## Files", ""] + [f"- `{name}`" for name in files] + [""]
    if "pareto.png" in files:
        lines += ["![trials](pareto.png)", ""]
    if "latency_cdf.png" in files:
        lines += ["![best candidate, simulated latency CDFs](latency_cdf.png)", ""]
    path.write_text("\n".join(lines))
    return path
