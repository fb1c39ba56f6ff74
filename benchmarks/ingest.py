"""Student ingestion (Algorithm 2): does a renamed concept cross, what each loss term does, what it costs.

    python benchmarks/ingest.py [--device cpu|cuda] [--steps 50]

A teacher trained on a OP b = over Z_11 with add, sub and the synonym 'minus' (= sub); a
differently shaped student trained independently on add and sub only ('minus' is in its
vocabulary but never trained). The packet carries token concepts read at the embedding
layer; ingestion injects 'token:minus'. Reported: accuracy of the student on 'a minus b ='
before and after, as % of its own accuracy on 'a sub b =' (the ceiling), per CAL kind and per
loss ablation, and ingestion wall time against a plain forward pass of the student over the
packet's probes (the reference run in this process).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client.student import (  # noqa: E402
    CALConfig,
    IngestConfig,
    LossWeights,
    ProbeSuite,
    Student,
    VerifierConfig,
    ingest,
)
from tests.student_pair import accuracy, make_synonym_pair, probes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    tmp_dir = tempfile.TemporaryDirectory()
    pair = make_synonym_pair(Path(tmp_dir.name))
    core, key, packet = pair["student"], pair["key"], pair["packet"]
    tm, sm = pair["teacher_metrics"], pair["student_metrics"]
    minus, answers = pair["minus"], pair["answers"]
    suite = pair["suite"]
    ceiling = accuracy(Student(copy.deepcopy(core)), pair["sub"], answers)
    print(
        f"teacher held-out {tm['test_accuracy']:.3f} (d=64, L=2) · student held-out {sm['test_accuracy']:.3f} "
        f"(d=48, L=3, never saw 'minus') · student on 'a sub b =' (ceiling) {ceiling:.3f}\n"
    )

    with tmp_dir:

        def run(config: IngestConfig) -> tuple[dict, float, float, float]:
            student = Student(copy.deepcopy(core))
            before = accuracy(student, minus, answers)
            start = time.perf_counter()
            report = ingest(student, packet, config, keys=key.verify_key, suite=suite)
            seconds = time.perf_counter() - start
            return report, before, accuracy(student, minus, answers), seconds

        print("| CAL | steps | 'minus' acc before | after | % of ceiling | decision | ingest s |")
        print("|---|---|---|---|---|---|---|")
        for kind in ("anchor", "linear", "lowrank", "mlp"):
            for steps in (0, args.steps):
                config = IngestConfig(
                    targets=["token:minus"],
                    cal=CALConfig(kind=kind, rank=4, hidden=64),
                    steps=steps,
                    device=args.device,
                )
                report, before, after, seconds = run(config)
                print(
                    f"| {kind} | {report['steps_run']} | {before:.3f} | {after:.3f} | {100 * after / ceiling:.1f} | "
                    f"{report['decision']} | {seconds:.2f} |"
                )

        print("\n| ablation (linear CAL) | geo | struct | reason | safety | total | 'minus' after |")
        print("|---|---|---|---|---|---|---|")
        flagged = ProbeSuite(task=suite.task, flagged={"far": list(probes("add"))}, flagged_position=1)
        for off in (None, "geo", "struct", "reason", "safety"):
            weights = {"geo": 1.0, "struct": 0.5, "reason": 0.5, "safety": 1.0, "safety_margin": -1.0}
            if off:
                weights[off] = 0.0
            config = IngestConfig(
                targets=["token:minus"],
                cal=CALConfig(kind="linear"),
                steps=args.steps,
                patience=10**6,
                loss=LossWeights(**weights),
                device=args.device,
                verifier=VerifierConfig(safety_threshold=1.0),
            )
            student = Student(copy.deepcopy(core))
            report = ingest(student, packet, config, keys=key.verify_key, suite=flagged)
            last = report["losses"][-1]
            print(
                f"| {'full' if off is None else 'without ' + off} | {last['geo']:.5f} | {last['struct']:.5f} | "
                f"{last['reason']:.5f} | {last['safety']:.5f} | {last['total']:.5f} | "
                f"{accuracy(student, minus, answers):.3f} |"
            )

        student = Student(copy.deepcopy(core))
        batch = student.reader.tokenize(list(probes("add")) * 3)
        start = time.perf_counter()
        ids, mask = batch.slice(0, len(batch), student.device)
        student.forward(ids, mask)
        reference = time.perf_counter() - start
        config = IngestConfig(
            targets=["token:minus"], cal=CALConfig(kind="linear"), steps=args.steps, patience=10**6, device=args.device
        )
        report, _, _, seconds = run(config)
        t = report["timings"]
        print(
            f"\ndevice {report['device']} (mixed precision: {report['mixed_precision']}): ingestion {seconds:.3f} s "
            f"= probe {t['probe']:.3f} + train {t['train']:.3f} ({t['steps_per_second']:.0f} steps/s) + verify "
            f"{t['verify']:.3f}; reference forward over the 36 probes {reference * 1000:.1f} ms; ratio "
            f"{seconds / reference:.0f}×"
        )
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
