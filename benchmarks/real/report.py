"""The real-model benchmark's records as a Markdown table, a JSON file, a plot, and the claim lines."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "claims", "markdown", "write_outputs"]

ORDER = [
    "teacher",
    "m2kt-words",
    "m2kt-general",
    "m2kt-general-refined",
    "m2kt",
    "m2kt-ridge",
    "m2kt-procrustes",
    "m2kt-translation",
    "m2kt-relative",
    "m2kt-anchor-labels",
    "m2kt-words-reuse",
    "m2kt-words-fresh",
    "m2kt-general-reuse",
    "m2kt-general-refined-reuse",
    "m2kt-reuse",
    "kd-logistic",
    "kd-centroid",
    "kd-words-centroid",
    "m2kt-shared",
    "student-k-centroid",
    "student-k-logistic",
    "oracle",
]
TARGET = 90.0  # % of teacher, private M2KT at <= 64 anchors
REUSE_MARGIN = 5.0  # points of % of teacher
BUDGETS = ["0", "16", "64", "256"]


def _mean_sd(values: Iterable[float | None]) -> tuple[float, float, int]:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str, str | None], dict[str, Any]]:
    """(scenario, condition, budget) → mean ± sd over seeds, and mean costs."""
    groups: dict[tuple[str, str, str | None], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["scenario"], r["condition"], r["budget"])].append(r)
    out = {}
    for key, rows in groups.items():
        pct, pct_sd, kept = _mean_sd(r["pct_of_teacher"] for r in rows)
        acc, acc_sd, _ = _mean_sd(r["accuracy"] for r in rows)
        out[key] = {
            "runs": len(rows),
            "accepted": kept,
            "pct": pct,
            "pct_sd": pct_sd,
            "accuracy": acc,
            "accuracy_sd": acc_sd,
            **{
                f: statistics.fmean(r[f] for r in rows)
                for f in ("labelled", "teacher_labelled", "teacher_queries", "anchors", "seconds")
            },
            "packet_bytes": statistics.fmean(r["packet_bytes"] for r in rows) if rows[0].get("packet_bytes") else None,
            "methods": sorted({str(r["method"]) for r in rows if r.get("method")}),
        }
    return out


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["accepted"] == 0:
        return "refused"
    text = f"{row['pct']:.1f} ± {row['pct_sd']:.1f}" if row["runs"] > 1 else f"{row['pct']:.1f}"
    return text + (f" ({row['accepted']}/{row['runs']} kept)" if row["accepted"] < row["runs"] else "")


def _scenarios(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["scenario"] for r in records))


def markdown(document: dict[str, Any]) -> str:
    records = document["records"]
    agg = aggregate(records)
    seeds = document["settings"]["seeds"]
    s = document["settings"]
    lines = [
        f"Test accuracy as % of the teacher's (mean ± sd over {seeds} seed(s)). Debian package descriptions, "
        f"{s['classes']} sections per concept set, {s['k']} labelled examples per section for the teacher, "
        f"{s['test']} test texts per section. N = public anchors (M2KT) = pool texts the teacher labels (KD); "
        f"N=0 for `m2kt-words` is {s['words']} words of a public word list and no shared text at all; "
        f"for `m2kt-general` it is {s.get('general', 0)} public descriptions of Debian sections in no concept set "
        "(a general anchor set, no domain anchor); `m2kt-general-refined` moves those mapped concepts one step "
        f"toward {s.get('unlabelled', 0)} of the student's own unlabelled texts of the set (no labels, no "
        "teacher queries; `m2kt.student.concepts.refined`). "
        "M2KT rows use 0 labels on the student's side and a packet with no teacher text "
        "(`m2kt-shared`, which carries the labelled texts, counts them as labels).",
        "",
    ]
    for scenario in _scenarios(records):
        lines.append(f"### {scenario}")
        lines.append("")
        teacher = agg.get((scenario, "teacher", None))
        if teacher:
            lines.append(
                f"Teacher accuracy {teacher['accuracy']:.3f} ± {teacher['accuracy_sd']:.3f} "
                f"({teacher['teacher_labelled']:.0f} labelled examples formed its concepts)."
            )
            lines.append("")
        lines.append("| condition | " + " | ".join(f"N={b}" for b in BUDGETS) + " | labels (k / all) | method |")
        lines.append("|---|" + "---|" * len(BUDGETS) + "---|---|")
        for condition in ORDER[1:]:
            cells = [_cell(agg.get((scenario, condition, b))) for b in BUDGETS]
            fixed = agg.get((scenario, condition, "k")) or agg.get((scenario, condition, "all"))
            if not any(cells) and fixed is None:
                continue
            extra = f"{_cell(fixed)} ({fixed['labelled']:.0f} labels)" if fixed else ""
            methods = sorted({m for b in BUDGETS for m in (agg.get((scenario, condition, b)) or {}).get("methods", [])})
            lines.append(f"| {condition} | " + " | ".join(cells) + f" | {extra} | {', '.join(methods)} |")
        lines.append("")
    lines.extend(_costs(agg, records))
    lines.append("")
    lines.extend(_timings(document))
    lines.append("")
    lines.extend(claims(document))
    return "\n".join(lines) + "\n"


def _costs(agg: dict, records: list[dict[str, Any]]) -> list[str]:
    out = [
        "Data accounting at N=64 (means over seeds): labels the student side used, labelled examples the teacher's "
        "concepts were formed from (the manifest's `labelled_examples`), teacher queries (the manifest's "
        "`probe_count`), public anchors, packet bytes, seconds per ingestion (or fit).",
        "",
        "| scenario | condition | student labels | teacher labelled | teacher queries | anchors | packet bytes "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario in [s for s in _scenarios(records) if "/" not in s]:
        for condition in ORDER:
            row = next(
                (agg[(scenario, condition, b)] for b in ("64", "k", "all", None) if (scenario, condition, b) in agg),
                None,
            )
            if row is None:
                continue
            size = f"{row['packet_bytes']:.0f}" if row["packet_bytes"] else "—"
            out.append(
                f"| {scenario} | {condition} | {row['labelled']:.0f} | {row['teacher_labelled']:.0f} | "
                f"{row['teacher_queries']:.0f} | {row['anchors']:.0f} | {size} | {row['seconds']:.3f} |"
            )
    return out


def _timings(document: dict[str, Any]) -> list[str]:
    rows = document.get("timings") or []
    if not rows:
        return []
    out = [
        "Timings on a cold cache (the first seed): packet build (teacher forward passes over its labelled examples and "
        "the anchors, signing), ingestion (verify, the student's vectors of the anchors, the alignment fit "
        "alone in brackets), classification of the test set (the student embeds every text).",
        "",
        "| scenario | packet | device | anchors | build s | teacher queries | ingest s (fit s) | classify s "
        "| texts/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in rows:
        out.append(
            f"| {t['scenario']} | {t.get('packet', 'pool')} | {t['device']} | {t['anchors']} | "
            f"{t['build_seconds']:.2f} | {t['teacher_queries']} | "
            f"{t['ingest_seconds']:.2f} ({t['fit_seconds']:.3f}) | {t['classify_seconds']:.2f} | "
            f"{t['classified'] / max(t['classify_seconds'], 1e-9):.0f} |"
        )
    for c in document.get("cli") or []:
        out.append("")
        out.append(
            f"CLI path ({c['scenario']}, N={c['anchors']}, the first seed): `m2kt ingest` + `m2kt classify` accuracy "
            f"{c['cli_accuracy']:.4f}, Python path {c['python_accuracy']:.4f}: "
            f"**{'same' if c['same'] else 'DIFFERENT'}**."
        )
    return out


def claims(document: dict[str, Any]) -> list[str]:
    """The issue's targets, each PASS or FAIL with the measured figure, for M2KT with and without words."""
    records = document["records"]
    agg = aggregate(records)
    out = ["Targets (M2KT: a private packet, 0 labels; `m2kt-words` adds the word list as general anchors):", ""]
    for scenario in [s for s in _scenarios(records) if "/" not in s]:
        for condition in ("m2kt-words", "m2kt-general", "m2kt-general-refined", "m2kt"):
            best = None
            for b in ("0", "16", "64"):
                row = agg.get((scenario, condition, b))
                if row and row["accepted"] and (best is None or row["pct"] > best[1]["pct"]):
                    best = (b, row)
            if best is not None:
                b, row = best
                verdict = "PASS" if row["pct"] >= TARGET else f"FAIL (short by {TARGET - row['pct']:.1f} points)"
                out.append(
                    f"- {scenario}: {condition} ≥ {TARGET:.0f}% of teacher at ≤ 64 domain anchors: **{verdict}** — "
                    f"{row['pct']:.1f} ± {row['pct_sd']:.1f}% at N={b} ({row['anchors']:.0f} anchors in all, "
                    f"{row['teacher_queries']:.0f} teacher queries)"
                )
            for b in ("16", "64", "256"):
                m = agg.get((scenario, condition, b))
                kds = [agg.get((scenario, c, b)) for c in ("kd-logistic", "kd-centroid", "kd-words-centroid")]
                kds = [k for k in kds if k is not None]
                if m is None or not kds:
                    continue
                kd = max(kds, key=lambda r: r["pct"])
                ok = m["accepted"] and m["pct"] >= kd["pct"]
                out.append(
                    f"- {scenario}: {condition} ≥ KD at N={b}: **{'PASS' if ok else 'FAIL'}** — {m['pct']:.1f} ± "
                    f"{m['pct_sd']:.1f}%, best KD {kd['pct']:.1f} ± {kd['pct_sd']:.1f}%"
                )
        shared, k = agg.get((scenario, "m2kt-shared", "k")), agg.get((scenario, "student-k-centroid", "k"))
        if shared and k:
            out.append(
                f"- {scenario}: a packet that shares its concepts' texts is the student training on those labels: "
                f"m2kt-shared {shared['pct']:.2f}% vs student-k-centroid {k['pct']:.2f}% (hence counted as labels)"
            )
        for sub in [s for s in _scenarios(records) if s.startswith(f"{scenario} / ")]:
            pairs = (
                ("m2kt-words", "m2kt-words-reuse"),
                ("m2kt-general", "m2kt-general-reuse"),
                ("m2kt-general-refined", "m2kt-general-refined-reuse"),
                ("m2kt", "m2kt-reuse"),
            )
            for first_name, reuse_name in pairs:
                for b in BUDGETS:
                    first, reuse = agg.get((scenario, first_name, b)), agg.get((sub, reuse_name, b))
                    if not first or not reuse or not reuse["accepted"]:
                        continue
                    gap = first["pct"] - reuse["pct"]
                    verdict = "PASS" if gap <= REUSE_MARGIN else f"FAIL ({gap:.1f} points below)"
                    out.append(
                        f"- {sub}: {reuse_name} of the N={b} alignment, 0 new queries, within {REUSE_MARGIN:.0f} "
                        f"points: **{verdict}** — {reuse['pct']:.1f} ± {reuse['pct_sd']:.1f}% vs the first set's "
                        f"{first['pct']:.1f}%"
                    )
            reuse, fresh = agg.get((sub, "m2kt-words-reuse", "0")), agg.get((sub, "m2kt-words-fresh", "0"))
            own = agg.get((sub, "student-k-centroid", "k"))
            if reuse and fresh:
                out.append(
                    f"- {sub}: what reuse keeps — the stored word-list alignment {reuse['pct']:.1f}% (0 new queries) "
                    f"vs this set's own word-list packet aligned afresh {fresh['pct']:.1f}% "
                    f"({fresh['teacher_queries']:.0f} teacher queries): {reuse['pct'] - fresh['pct']:+.1f} points"
                    + (f"; the student with this set's k labels {own['pct']:.1f}%" if own else "")
                )
    return out


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = document["records"]
    agg = aggregate(records)
    scenarios = [s for s in _scenarios(records) if "/" not in s]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for condition in ("m2kt-words", "m2kt", "kd-logistic", "kd-centroid", "kd-words-centroid"):
            pts = [(int(b), agg[(scenario, condition, b)]) for b in BUDGETS if (scenario, condition, b) in agg]
            pts = [(x, r) for x, r in pts if r["accepted"]]
            if not pts:
                continue
            xs = [max(x, 4) for x, _ in pts]
            ax.errorbar(
                xs,
                [r["pct"] for _, r in pts],
                yerr=[r["pct_sd"] for _, r in pts],
                marker="o",
                capsize=3,
                label=condition,
            )
        k = agg.get((scenario, "student-k-logistic", "k"))
        if k:
            ax.axhline(k["pct"], color="grey", ls=":", label=f"student, {k['labelled']:.0f} labels")
        ax.axhline(TARGET, color="red", ls="--", lw=0.8, label=f"{TARGET:.0f}% target")
        ax.set_xscale("log", base=2)
        ax.set_xticks([4, 16, 64, 256], ["0", "16", "64", "256"])
        ax.set_xlabel("N public anchors / KD queries (0: word list only)")
        ax.set_ylabel("% of teacher accuracy")
        ax.set_title(scenario)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(document: dict[str, Any], out: Path, log: Callable[[str], None] = print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(document)
    header = f"# Real-model benchmark\n\n`{document.get('command', 'm2kt bench real')}`\n\n"
    (out / "real.md").write_text(header + table, encoding="utf-8")
    (out / "real.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    plot(document, out / "real.png")
    log("")
    log(table)
    log(f"wrote {out / 'real.md'}, {out / 'real.json'}, {out / 'real.png'}")


def main(argv: list[str] | None = None) -> int:
    """Re-render real.md and real.png from a saved real.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m m2kt.benchmarks.real.report", description=main.__doc__)
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    write_outputs(json.loads(args.json.read_text(encoding="utf-8")), args.json.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
