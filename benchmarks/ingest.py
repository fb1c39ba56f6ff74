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

from client.keys import SigningKey  # noqa: E402
from client.student import (  # noqa: E402
    CALConfig,
    IngestConfig,
    LossWeights,
    ProbeSuite,
    Student,
    VerifierConfig,
    ingest,
)
from client.teacher import ConceptsSpec, NamedProbe, PacketSpec, build_packet  # noqa: E402
from client.teacher.tiny_model import TinyConfig, TrainConfig, train_tiny  # noqa: E402
from tests.test_student_ingest import STUDENT_TASK, TEACHER_TASK, probes  # noqa: E402


def accuracy(student: Student, texts: list[str], answers: list[str]) -> float:
    return sum(p == a for p, a in zip(student.predict(texts), answers, strict=True)) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    teacher, tm = train_tiny(TEACHER_TASK, TinyConfig.for_task(TEACHER_TASK), TrainConfig(seed=0, steps=600))
    core, sm = train_tiny(
        STUDENT_TASK,
        TinyConfig.for_task(STUDENT_TASK, d_model=48, n_heads=3, n_layers=3),
        TrainConfig(seed=1, steps=600),
    )
    key = SigningKey.from_seed(bytes(range(32)))
    named = tuple(NamedProbe(label=f"token:{op}", inputs=probes(op), position=1) for op in ("add", "sub", "minus"))
    subs = [e for e in STUDENT_TASK.examples() if e.operator == "sub"]
    minus = [" ".join(e.tokens).replace(" sub ", " minus ") for e in subs]
    answers = [e.answer for e in subs]
    suite = ProbeSuite(task=[" ".join(e.tokens) for e in STUDENT_TASK.examples()][::3])
    ceiling = accuracy(Student(copy.deepcopy(core)), [" ".join(e.tokens) for e in subs], answers)
    print(
        f"teacher held-out {tm['test_accuracy']:.3f} (d=64, L=2) · student held-out {sm['test_accuracy']:.3f} "
        f"(d=48, L=3, never saw 'minus') · student on 'a sub b =' (ceiling) {ceiling:.3f}\n"
    )

    with tempfile.TemporaryDirectory() as tmp:
        packet = build_packet(
            teacher,
            PacketSpec(topic="arith.synonyms", layer="embed", concepts=ConceptsSpec(named=named)),
            key,
            Path(tmp) / "p.m2kt",
        )

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
