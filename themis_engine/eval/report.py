"""report.md (tables), report.png (accuracy by aspect x language) and the --compare leaderboard.

The leaderboard reads any directory holding a results.json in the published CRB format (this
evaluator's outputs, or the published results of other reward models); a directory without one
stands for its sub-directories that have one (e.g. the whole crb-published-results folder).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from themis_engine.errors import CompareError
from themis_engine.fileio import atomic_write

logger = logging.getLogger("themis_engine")



@dataclass
class Entry:
    """One reward model on the leaderboard."""

    name: str
    path: Path | None
    results: dict
    this_run: bool = False

    @property
    def accuracy(self) -> float:
        return float(self.results["overall"]["accuracy"])

    @property
    def examples(self) -> int:
        return int(self.results["overall"]["total_examples"])


# ------------------------------------------------------------------------------------- leaderboard
def _read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CompareError(f"{path}: not valid JSON ({err})") from None
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("overall"), dict)
        and "accuracy" in data["overall"]
        and "total_examples" in data["overall"]
        and isinstance(data.get("by_aspect", {}), dict)
    )
    if not ok:
        raise CompareError(
            f"{path}: not a CodeRewardBench results.json (needs overall.accuracy and overall.total_examples)"
        )
    return data


def load_entries(dirs: Sequence[str | Path], exclude: Sequence[Path] = ()) -> list[Entry]:
    """Result directories -> entries, named after their directory; `exclude` (resolved paths) skipped."""
    skip = {Path(p).resolve() for p in exclude}
    entries: list[Entry] = []
    seen: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if (d / "results.json").is_file():
            found = [d]
        elif d.is_dir():
            found = sorted(p for p in d.iterdir() if (p / "results.json").is_file())
            if not found:
                raise CompareError(f"--compare {d}: no results.json in it or in its sub-directories")
        else:
            raise CompareError(f"--compare {d}: no such directory")
        for p in found:
            rp = p.resolve()
            if rp in skip or rp in seen:
                continue
            seen.add(rp)
            entries.append(Entry(p.name, p, _read_results(p / "results.json")))
    return entries


def _abbrev(names: Sequence[str]) -> dict[str, str]:
    short = {n: "".join(part[:1].upper() for part in n.replace("-", "_").split("_") if part) or n for n in names}
    if len(set(short.values())) != len(short):
        return {n: n for n in names}
    return short


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.2f}"


def leaderboard_markdown(entries: Sequence[Entry]) -> str:
    """One table, best overall accuracy first; this run's row in bold."""
    aspects = sorted({a for e in entries for a in e.results.get("by_aspect", {})})
    short = _abbrev(aspects)
    ranked = sorted(entries, key=lambda e: (-e.accuracy, e.name))
    header = ["rank", "reward model", "accuracy (%)"] + [short[a] for a in aspects] + ["examples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for i, e in enumerate(ranked, 1):
        by = e.results.get("by_aspect", {})
        name = f"**{e.name}** (this run)" if e.this_run else e.name
        cells = [str(i), name, _pct(e.accuracy)] + [_pct(by.get(a, {}).get("accuracy")) for a in aspects]
        cells.append(str(e.examples))
        if e.this_run:
            cells = [f"**{c}**" if j != 1 else c for j, c in enumerate(cells)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if any(short[a] != a for a in aspects):
        notes.append("Columns: " + ", ".join(f"{short[a]} = {a}" for a in aspects) + ".")
    sizes = sorted({e.examples for e in entries})
    if len(sizes) > 1:
        notes.append(
            "The entries were scored on different numbers of pairs (" + ", ".join(map(str, sizes))
            + "); accuracies are comparable only on the same rows."
        )
    return "\n".join(lines + ([""] + notes if notes else []))


# ------------------------------------------------------------------------------------- aspect x language
def cross_table(aspect: Sequence[str], language: Sequence[str], correct: Sequence[bool]):
    """(aspects, languages, accuracy [A, L] with NaN where empty, count [A, L])."""
    aspects = sorted(set(aspect))
    languages = sorted(set(language))
    ai = {a: i for i, a in enumerate(aspects)}
    li = {l: j for j, l in enumerate(languages)}
    right = np.zeros((len(aspects), len(languages)))
    count = np.zeros((len(aspects), len(languages)), dtype=np.int64)
    for a, l, ok in zip(aspect, language, correct):
        count[ai[a], li[l]] += 1
        right[ai[a], li[l]] += bool(ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, right / np.maximum(count, 1), np.nan)
    return aspects, languages, acc, count


def write_heatmap(path: str | Path, aspect, language, correct, title: str = "") -> bool:
    """report.png: accuracy per (aspect, language), with counts. False (and a warning) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no report.png (pip install 'themis-engine[eval]')")
        return False
    aspects, languages, acc, count = cross_table(aspect, language, correct)
    fig = Figure(figsize=(1.2 * len(languages) + 3.5, 0.7 * len(aspects) + 2.0), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#e8e8e8")  # the (aspect, language) cells with no rows
    masked = np.ma.masked_invalid(acc)
    im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(languages)), labels=languages, rotation=30, ha="right")
    ax.set_yticks(range(len(aspects)), labels=aspects)
    for i in range(len(aspects)):
        for j in range(len(languages)):
            text = "–" if count[i, j] == 0 else f"{acc[i, j]:.3f}\nn={count[i, j]}"
            dark = count[i, j] > 0 and not 0.2 <= acc[i, j] <= 0.85  # the colormap's dark ends
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or "accuracy by aspect and language")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return True


# ------------------------------------------------------------------------------------- report.md
def _group_table(title: str, column: str, table: dict) -> list[str]:
    lines = [f"## {title}", "", f"| {column} | accuracy | count |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['accuracy']:.4f} | {v['count']} |" for name, v in table.items()]
    return lines + [""]


def report_markdown(
    name: str,
    results: dict,
    settings: dict[str, str],
    aspect: Sequence[str],
    language: Sequence[str],
    correct: Sequence[bool],
    heatmap: str | None = "report.png",
    leaderboard: str | None = None,
) -> str:
    o = results["overall"]
    lines = [f"# CodeRewardBench results: {name}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += [
        "",
        "## Overall",
        "",
        "| accuracy | correct | examples | mean score diff | median score diff | std score diff |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {o['accuracy']:.4f} | {o['correct_predictions']} | {o['total_examples']} | "
        f"{o['mean_score_difference']:.4f} | {o['median_score_difference']:.4f} | {o['std_score_difference']:.4f} |",
        "",
        "A pair is correct when the chosen response scores strictly higher than the rejected one (a tie is wrong).",
        "",
    ]
    lines += _group_table("By aspect", "aspect", results["by_aspect"])
    lines += _group_table("By language", "language", results["by_language"])
    lines += _group_table("By subset", "subset", results["by_subset"])
    aspects, languages, acc, count = cross_table(aspect, language, correct)
    lines += ["## Accuracy by aspect and language", "", "| aspect | " + " | ".join(languages) + " |",
              "|---|" + "---:|" * len(languages)]
    for i, a in enumerate(aspects):
        cells = ["–" if count[i, j] == 0 else f"{acc[i, j]:.4f} ({count[i, j]})" for j in range(len(languages))]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines.append("")
    if heatmap:
        lines += [f"![accuracy by aspect and language]({heatmap})", ""]
    if leaderboard:
        lines += ["## Leaderboard", "", leaderboard, ""]
    return "\n".join(lines)


def write_text(path: str | Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
