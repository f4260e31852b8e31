"""The benchmark's report, rebuilt from the stored results alone: ``results.csv``, ``results.md`` (summaries, cost,
per-case tables with paired tests, the lines where DiffDenoise loses, training curves, the oracle gate) and one
figure per case."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from diffdenoise.benchmark.cases import Case
from diffdenoise.benchmark.methods import METHODS, PIPELINE_METHODS
from diffdenoise.data import load_datalist
from diffdenoise.report import paired_best, save_visual_grid, significance_table

_CSV_COLUMNS = ("case", "dataset", "noise", "level", "correlation", "reference", "method", "kind", "slice", "psnr",
                "ssim", "leak")


def losses_line(scores: Mapping[str, Mapping[str, np.ndarray]], kinds: Mapping[str, str],
                labels: Mapping[str, str]) -> str | None:
    """Where a ``diffdenoise`` method has a lower mean PSNR or SSIM than another method, said in one line.

    Returns:
        None when no DiffDenoise method is in ``scores``; otherwise the losses (with the paired Wilcoxon p)
        or a line saying there are none.
    """
    ours = [name for name in scores if kinds[name] == "diffdenoise"]
    if not ours:
        return None
    losses = []
    for name in ours:
        for other in scores:
            if kinds[other] == "diffdenoise":
                continue
            for metric, digits in (("psnr", 2), ("ssim", 4)):
                mine, theirs = float(np.mean(scores[name][metric])), float(np.mean(scores[other][metric]))
                if theirs > mine:
                    p = paired_best({other: scores[other][metric], name: scores[name][metric]}).p_values[name]
                    losses.append(f"{labels[name]} < {labels[other]} in {metric.upper()} "
                                  f"({mine:.{digits}f} vs {theirs:.{digits}f}, p = {p:.3g})")
    if not losses:
        return f"DiffDenoise ({', '.join(labels[n] for n in ours)}) has the highest mean PSNR and SSIM here."
    return "**DiffDenoise loses here:** " + "; ".join(losses) + "."


def _best_note(scores: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str]) -> str:
    """The paired-test verdict on each metric's best, in words."""
    notes = []
    for metric in ("psnr", "ssim"):
        test = paired_best({k: s[metric] for k, s in scores.items()})
        if test.significant:
            notes.append(f"best {metric.upper()}: {labels[test.best]}, above every other method (p < {test.alpha})")
        else:
            ties = ", ".join(f"{labels[k]} (p = {p:.3g})" for k, p in test.p_values.items() if p >= test.alpha)
            notes.append(f"best {metric.upper()}: {labels[test.best]}, not significant against {ties or 'nothing'}")
    return "Paired Wilcoxon signed-rank tests over test slices: " + "; ".join(notes) + "."


def oracle_gate(scores: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str]) -> str | None:
    """Why a case is under-trained, or None: when the supervised oracle (clean pairs, the same training budget) does
    not beat BM3D in mean PSNR, the budget rather than the training signal may set every learned method's score,
    so the case's ranking claims nothing. None too when either method has no result there."""
    if "supervised" not in scores or "bm3d" not in scores:
        return None
    oracle, bm3d = float(np.mean(scores["supervised"]["psnr"])), float(np.mean(scores["bm3d"]["psnr"]))
    if oracle > bm3d:
        return None
    return (f"**Under-trained:** {labels['supervised']} ({oracle:.2f} dB) does not beat {labels['bm3d']} "
            f"({bm3d:.2f} dB) here, so the training budget may set the learned methods' scores; this case's "
            "best and losses are not claimed.")


def _verdict(curve: Mapping) -> str:
    """How a training run ended: converged (by the plateau rule), cap hit, or no rule (it ran its steps)."""
    if curve["rule"] is None:
        return "no rule"
    return "converged" if curve["converged"] else "cap hit" if curve["cap_hit"] else "stopped"


def _training_cell(record: Mapping) -> str:
    """Steps run and the verdict of each training curve a result holds; empty for a result without one."""
    return "; ".join(f"{name}: {curve['steps_run']}/{curve['cap']} steps, {_verdict(curve)}"
                     for name, curve in record.get("curves", {}).items())


def _curves_table(records: Mapping[str, dict], labels: Mapping[str, str], points: int = 6) -> str | None:
    """The validation-loss curve of each learned result of a case, ``points`` evenly spaced validations as
    ``step: loss``, or None when no result holds one."""
    rows = ["| method | curve | steps run / cap | verdict | validation loss (step: loss) |", "|---|---|---|---|---|"]
    for name, record in records.items():
        for curve_name, curve in record.get("curves", {}).items():
            picks = np.unique(np.linspace(0, len(curve["steps"]) - 1, min(points, len(curve["steps"]))).round()
                              .astype(int)) if curve["steps"] else []
            series = ", ".join(f"{curve['steps'][i]}: {curve['losses'][i]:.4g}" for i in picks)
            rows.append(f"| {labels[name]} | {curve_name} | {curve['steps_run']} / {curve['cap']} | {_verdict(curve)} | "
                        f"{series} |")
    return "\n".join(rows) if len(rows) > 2 else None


def _summary(records: Mapping[tuple[str, str], dict], cases: Sequence[Case], names: Sequence[str],
             labels: Mapping[str, str], metric: str, digits: int, rank: bool = True,
             undertrained: Sequence[str] = ()) -> str:
    """One row per case, one column per method: the mean score, best marked as in the case tables (``rank``), except
    on ``undertrained`` cases, which are marked and not ranked."""
    rows = ["| case | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for case in cases:
        scores = {n: np.asarray(records[case.name, n][metric]) for n in names
                  if (case.name, n) in records and metric in records[case.name, n]}
        if not scores:
            continue
        test = paired_best(scores) if rank and case.name not in undertrained else None
        cells = []
        for name in names:
            if name not in scores:
                cells.append("")
                continue
            cell = f"{scores[name].mean():.{digits}f}"
            if test is not None and name == test.best:
                cell = f"**{cell}**" if test.significant else f"{cell} (n.s.)"
            cells.append(cell)
        rows.append(f"| {_case_label(case.name, undertrained)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _case_label(name: str, undertrained: Sequence[str]) -> str:
    return f"{name} (under-trained)" if name in undertrained else name


def write_report(out: Path, cases: Sequence[Case], names: Sequence[str], skipped: Mapping[str, str],
                 header: Mapping[str, str], max_test_slices: int | None = None) -> Path:
    """``results.csv``, ``results.md`` and ``figures/<case>.png`` from the stored per-(case, method) results.

    Only (case, method) pairs with a stored result appear; the tables depend on those files alone, so a
    resumed run writes the same tables (only the header's wall time differs).
    """
    records = {}
    for case in cases:
        for name in names:
            path = out / "cases" / case.name / f"{name}.json"
            if path.is_file():
                records[case.name, name] = json.loads(path.read_text())
    labels = {name: METHODS[name].label for name in names}
    kinds = {name: METHODS[name].kind for name in names}
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_CSV_COLUMNS)
        for (case_name, name), record in records.items():
            case = next(c for c in cases if c.name == case_name)
            leak = record.get("leak", [""] * len(record["slices"]))
            for row in zip(record["slices"], record["psnr"], record["ssim"], leak):
                writer.writerow([case.name, case.dataset, case.noise, "" if case.level is None else f"{case.level:.6g}",
                                 case.correlation, case.reference, name, kinds[name], *row])
    case_scores = {case.name: {n: {m: np.asarray(records[case.name, n][m]) for m in ("psnr", "ssim")}
                               for n in names if (case.name, n) in records} for case in cases}
    gates = {name: line for name, scores in case_scores.items() if (line := oracle_gate(scores, labels))}
    costs = {case.name: _case_cost(out / "cases" / case.name, [r for (c, _), r in records.items() if c == case.name])
             for case in cases}
    lines = ["# Benchmark results", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines.append(f"- method time recorded in these results (fit + denoise, earlier runs included; each pipeline step "
                 f"once): {sum(wall for wall, _ in costs.values()):.0f} s wall, "
                 f"{sum(cpu for _, cpu in costs.values()):.0f} s process CPU")
    lines += [f"- skipped {name}: {reason}" for name, reason in skipped.items()]
    lines += ["", "Scores on the test split against each case's reference (see docs/benchmark.md). Best mean in "
              "**bold** when a paired Wilcoxon signed-rank test puts it above every other method (p < 0.05), "
              "else marked (n.s.). A case whose supervised oracle does not beat BM3D is marked (under-trained) and not "
              "ranked: its learned methods' budgets, not their training signals, may set their scores.", ""]
    for metric, digits, unit in (("psnr", 2, " (dB)"), ("ssim", 4, "")):
        summary = _summary(records, cases, names, labels, metric, digits, undertrained=list(gates))
        lines += [f"## Summary: mean {metric.upper()}{unit}", "", summary, ""]
    lines += ["## Summary: noise leak", "", "Correlation of (output - reference) with (noisy - reference), mean over "
              "slices (diffdenoise.metrics.noise_leak): 1 for the noisy input, near 0 for an output that keeps none of "
              "the input's noise; results stored before this column have none.", "",
              _summary(records, cases, names, labels, "leak", 3, rank=False, undertrained=list(gates)), ""]
    lines += ["## Cost per case", "", "Fit and denoise time of every stored result of the case, each step of its "
              "DiffDenoise pipeline run counted once (the methods share it); process CPU includes all threads.", "",
              "| case | wall (s) | process CPU (s) |", "|---|---|---|"]
    lines += [f"| {_case_label(name, list(gates))} | {wall:.0f} | {cpu:.0f} |" for name, (wall, cpu) in costs.items()
              if wall or cpu]
    lines.append("")
    for case in cases:
        done = [name for name in names if (case.name, name) in records]
        if not done:
            continue
        scores = case_scores[case.name]
        extra = {
            "fit (s)": {n: f"{records[case.name, n]['fit_seconds']:.1f}" for n in done},
            "denoise (s/slice)": {n: f"{records[case.name, n]['denoise_seconds_per_slice']:.2f}" for n in done},
        }
        training = {n: cell for n in done if (cell := _training_cell(records[case.name, n]))}
        if training:
            extra["training"] = training
        split = len(load_datalist(out / "cases" / case.name / "data" / "datalist.json", "test"))
        figure = _case_figure(out, case, done, labels)
        lines += [f"## {_case_label(case.name, list(gates))}", "", f"{case.describe()}. Test slices scored: "
                  f"{len(scores[done[0]]['psnr'])} of {split}"
                  + (f" (max_test_slices {max_test_slices}, evenly spaced)" if max_test_slices else "")
                  + ".", "", significance_table(scores, labels, extra_columns=extra), ""]
        if case.name in gates:
            lines.append(gates[case.name])
        else:
            loss = losses_line(scores, kinds, labels)
            lines += [_best_note(scores, labels)] + (["", loss] if loss else [])
        curves = _curves_table({n: records[case.name, n] for n in done}, labels)
        lines += ["", "Training curves (validation loss on held-out slices; diffdenoise.convergence):", "", curves] \
            if curves else []
        absent = [labels[n] for n in names if n not in done]
        lines += ["", f"No result on this case (the preset's method_cases, or not run yet): {', '.join(absent)}."] \
            if absent else []
        lines += ["", f"![{case.name}]({figure.relative_to(out).as_posix()})", ""]
    report = out / "results.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _case_cost(case_dir: Path, records: Sequence[dict]) -> tuple[float, float]:
    """(wall, process-CPU) seconds spent on a case's stored results, each pipeline step once.

    A pipeline method's ``fit_seconds`` is the sum of the pipeline steps it needs, shared with the other pipeline
    methods, so those steps are counted from the run's ``state.json`` instead."""
    wall = cpu = 0.0
    for record in records:
        slices = len(record["slices"])
        wall += record["denoise_seconds_per_slice"] * slices
        cpu += record["denoise_cpu_seconds_per_slice"] * slices
        if record["method"] not in PIPELINE_METHODS:
            wall, cpu = wall + record["fit_seconds"], cpu + record["fit_cpu_seconds"]
    for state in sorted((case_dir / "work").glob("pipeline*/state.json")):
        if any(record["method"] in PIPELINE_METHODS for record in records):
            steps = json.loads(state.read_text())
            own = [name for name in steps["seconds"] if name not in steps.get("shared", [])]
            wall, cpu = wall + sum(steps["seconds"][n] for n in own), cpu + sum(steps["cpu_seconds"][n] for n in own)
    return wall, cpu


def _case_figure(out: Path, case: Case, names: Sequence[str], labels: Mapping[str, str]) -> Path:
    """The visual grid of one case: noisy input, each method's output, the reference (figure slice of the results)."""
    case_dir = out / "cases" / case.name
    record = json.loads((case_dir / f"{names[0]}.json").read_text())
    item = next(i for i in load_datalist(case_dir / "data" / "datalist.json", "test")
                if i["id"] == record["slices"][len(record["slices"]) // 2])
    reference = np.load(item["clean"])
    images = [np.load(item["image"])] + [np.load(case_dir / f"{n}.npy") for n in names if n != "noisy"] + [reference]
    titles = ["noisy input"] + [labels[n] for n in names if n != "noisy"] + ["reference"]
    return save_visual_grid(images, titles, reference, out / "figures" / f"{case.name}.png")
