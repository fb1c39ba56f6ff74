"""Student ingestion (Algorithm 2): does a renamed concept cross, what each loss term does, what it costs.

    python -m m2kt.benchmarks.ingest [--device cpu|cuda] [--steps 50]

The pair of tests/student_pair.py: a teacher that knows the synonyms 'plus' and 'minus' and the
number alias "seven'"; a differently shaped, independently trained student that has those
tokens in its vocabulary but never trained them. Two packets: operator concepts at the embedding
layer (token + position) and number concepts at the token embedding alone. Reported: the
student's accuracy on expressions with each new token before and after ingestion, as % of its
own accuracy with the known token (the ceiling), per CAL kind; a loss ablation; and ingestion
wall time against a plain forward pass of the student over the probes (the reference run).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from m2kt.benchmarks.harness.student_pair import ALIAS, STUDENT_TASK, accuracy, alias_packet, make_synonym_pair, probes
from m2kt.student import CALConfig, IngestConfig, InjectConfig, LossWeights, ProbeSuite, Student, VerifierConfig, ingest


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
    cases = {  # new token -> (its expressions, the same with the known token, answers)
        "plus": (pair["plus"], pair["add"], pair["add_answers"]),
        "minus": (pair["minus"], pair["sub"], pair["answers"]),
    }
    alias_examples = [e for e in STUDENT_TASK.examples(use_aliases=True) if ALIAS in e.tokens]
    cases[ALIAS] = (
        [" ".join(e.tokens) for e in alias_examples],
        [" ".join(e.tokens).replace(ALIAS, "7") for e in alias_examples],
        [e.answer for e in alias_examples],
    )
    reference_student = Student(copy.deepcopy(core))
    ceiling = {k: accuracy(reference_student, own, ans) for k, (_, own, ans) in cases.items()}
    print(
        f"teacher held-out {tm['test_accuracy']:.3f} (d=64, L=2) · student held-out {sm['test_accuracy']:.3f} "
        f"(d=48, L=3; never saw plus, minus, {ALIAS}) · ceilings (student on the known token): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items())
        + "\n"
    )

    with tmp_dir:
        alias = alias_packet(pair, Path(tmp_dir.name) / "aliases.m2kt")

        def run(config: IngestConfig, which: list[str], source: Path) -> tuple[dict, dict, dict, float]:
            student = Student(copy.deepcopy(core))
            before = {k: accuracy(student, cases[k][0], cases[k][2]) for k in which}
            start = time.perf_counter()
            report = ingest(student, source, config, keys=key.verify_key, suite=suite)
            seconds = time.perf_counter() - start
            return report, before, {k: accuracy(student, cases[k][0], cases[k][2]) for k in which}, seconds

        print("| packet | CAL | steps | new token: acc before → after (% of ceiling) | decision | ingest s |")
        print("|---|---|---|---|---|---|")
        for kind in ("anchor", "linear", "lowrank", "mlp"):
            for steps in (0, args.steps):
                for name, source, which, layer in (
                    ("operators @ embed", packet, ["plus", "minus"], "embed"),
                    ("numbers @ embed.tok", alias, [ALIAS], "embed.tok"),
                ):
                    config = IngestConfig(
                        targets=[f"token:{w}" for w in which],
                        cal=CALConfig(kind=kind, rank=4, hidden=64),
                        inject=InjectConfig(layer=layer),
                        steps=steps,
                        device=args.device,
                    )
                    report, before, after, seconds = run(config, which, source)
                    cells = "; ".join(
                        f"{w} {before[w]:.3f} → {after[w]:.3f} ({100 * after[w] / ceiling[w]:.0f}%)" for w in which
                    )
                    print(f"| {name} | {kind} | {report.steps_run} | {cells} | {report.decision} | {seconds:.2f} |")

        print("\n| ablation (linear CAL) | geo | struct | reason | safety | total | 'minus' after |")
        print("|---|---|---|---|---|---|---|")
        flagged = ProbeSuite(task=suite.task, flagged={"far": list(probes("add"))}, flagged_position=1)
        for off in (None, "geo", "struct", "reason", "safety"):
            weights = {"geo": 1.0, "struct": 0.5, "reason": 0.5, "safety": 1.0, "safety_margin": -1.0}
            if off:
                weights[off] = 0.0
            config = IngestConfig(
                targets=["token:plus", "token:minus"],
                cal=CALConfig(kind="linear"),
                steps=args.steps,
                patience=10**6,
                loss=LossWeights(**weights),
                device=args.device,
                verifier=VerifierConfig(safety_threshold=1.0),
            )
            student = Student(copy.deepcopy(core))
            report = ingest(student, packet, config, keys=key.verify_key, suite=flagged)
            last = report.losses[-1]
            print(
                f"| {'full' if off is None else 'without ' + off} | {last['geo']:.5f} | {last['struct']:.5f} | "
                f"{last['reason']:.5f} | {last['safety']:.5f} | {last['total']:.5f} | "
                f"{accuracy(student, minus, answers):.3f} |"
            )

        student = Student(copy.deepcopy(core))
        batch = student.reader.tokenize(list(probes("add")) * 4)  # as many inputs as the packet has probes
        start = time.perf_counter()
        ids, mask = batch.slice(0, len(batch), student.device)
        student.forward(ids, mask)
        reference = time.perf_counter() - start
        config = IngestConfig(
            targets=["token:plus", "token:minus"],
            cal=CALConfig(kind="linear"),
            steps=args.steps,
            patience=10**6,
            device=args.device,
        )
        report, _, _, seconds = run(config, ["plus", "minus"], packet)
        t = report.timings
        print(
            f"\ndevice {report.device} (mixed precision: {report.mixed_precision}): ingestion {seconds:.3f} s "
            f"= probe {t['probe']:.3f} + train {t['train']:.3f} ({t['steps_per_second']:.0f} steps/s) + verify "
            f"{t['verify']:.3f}; reference forward over {len(batch)} probe inputs {reference * 1000:.1f} ms; ratio "
            f"{seconds / reference:.0f}×"
        )
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
