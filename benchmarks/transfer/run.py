"""Run the transfer benchmark: every condition × budget × scenario on every pair, then report.

    m2kt bench transfer [--quick] [--seeds N] [--out DIR] [--p P] [--device cpu|cuda] [--scenario NAME=KNOWN:EXPR ...]
                        [--budgets 0,8,32,2%,...] [--no-loss-ablations]
    python -m m2kt.benchmarks.transfer ...                                     (the same)

Without ``--scenario`` the scenarios are concept (renaming), skill (sub → a+b) and composition
(add, sub → a+2b); each ``--scenario`` names a new-operation scenario instead (the defaults, concept
included, are then not run), e.g. ``--scenario a-2b=add,sub:a-2*b --scenario times=add,sub:a*b``; a default
new-operation scenario can be named bare (``--scenario skill --scenario composition``). ``--budgets``
replaces the list of budgets, ``--no-loss-ablations`` drops the composite-loss ablations (the
re-binding ablations always run).

Run i (i < seeds) uses pair i mod 3 with seed i: models, splits of the pool and CAL seeds all
follow from it. ``--quick`` is one run with fewer budgets and steps (under 10 minutes on a 2-core
CPU); the default is three runs, one per pair.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2kt.benchmarks.transfer.methods import LossMix, Trainee, accuracy, make_trainee, train_m2kt, train_outputs
from m2kt.benchmarks.transfer.models import evaluate, train_model
from m2kt.benchmarks.transfer.packets import anchor_tokens, write_transfer_packet
from m2kt.benchmarks.transfer.rebinding import REBIND_CONDITIONS, probes_for, run_rebind
from m2kt.benchmarks.transfer.report import write_outputs
from m2kt.benchmarks.transfer.scenarios import (
    DEFAULT_OPS,
    PAIRS,
    TEMPLATE,
    OpSpec,
    PairShape,
    Scenario,
    World,
    build_world,
)
from m2kt.format.keys import SigningKey
from m2kt.nn.device import pick_device
from m2kt.nn.programs import Template
from m2kt.student.probing import PacketContents, read_packet
from m2kt.toy.model import TinyTransformer
from m2kt.toy.symbolic import Example, Vocabulary

__all__ = ["Settings", "main", "parse_budgets", "run_benchmark", "scenario_topic"]

Budget = int | float  # an int is a count of queries (or labels); a float a fraction of the pool


@dataclass
class Settings:
    """Everything a run depends on (recorded in the JSON)."""

    p: int = 23
    seeds: int = 3
    budgets: list[Budget] = field(default_factory=lambda: [0, 8, 32, 0.02, 0.1, 0.25, 0.5, 1.0])
    model_steps: int = 600  # the teacher, from scratch
    # The student core must know its own operations before anything is transferred into it: a share of
    # its own examples is held out (never the test set), it trains until that share is answered at
    # core_target (at most core_steps steps), and a core that misses is retrained from the next seed.
    core_validation: float = 0.1
    core_target: float = 0.99
    core_steps: int = 1500
    core_attempts: int = 3
    scratch_steps: int = 300  # a fresh student-shaped model on the budget's labelled examples
    # Adam steps for every condition that trains the CAL (and adapters), per scenario family: the
    # skill family trains adapters and needs more for full-pool KD to reach the teacher.
    transfer_steps: dict[str, int] = field(default_factory=lambda: {"concept": 200, "skill": 800})
    trust_region: float = 0.3  # M2KT: injected targets stay within this relative distance of the zero-shot map
    oracle_steps: int = 1000
    lr: float = 1e-2
    device: str = "auto"
    quick: bool = False
    scenarios: list[str] = field(default_factory=list)  # NAME=KNOWN:EXPR specs; empty: the default scenarios
    loss_ablations: bool = True  # the composite-loss ablations (m2kt-no-geo, ...) on the skill scenario

    @classmethod
    def quick_run(cls, **overrides: Any) -> Settings:
        base = dict(
            seeds=1,
            budgets=[0, 8, 32, 0.02, 1.0],
            transfer_steps={"concept": 150, "skill": 800},
            oracle_steps=800,
            quick=True,
        )
        return cls(**{**base, **overrides})


def scenario_topic(name: str) -> str:
    """The packet topic of a scenario: ``bench.<name>`` with what a topic may not hold (``2a+b``) as ``-``."""
    return "bench." + (re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "scenario")


def budget_label(budget: Budget | str) -> str:
    """``0.02`` → ``"2%"``, ``8`` → ``"8"``; a string (e.g. ``"pool+test"``) as it is."""
    return f"{budget * 100:g}%" if isinstance(budget, float) else str(budget)


@dataclass
class Context:
    """One run: a pair's models and one scenario."""

    run: int
    pair: PairShape
    world: World
    scenario: Scenario
    teacher: TinyTransformer
    core: TinyTransformer
    key: SigningKey
    workdir: Path
    device: torch.device
    settings: Settings
    anchors: list[str]
    records: list[dict[str, Any]]
    teacher_accuracy: dict[str, float]
    core_info: dict[str, Any] = field(default_factory=dict)  # how the student core was trained and gated
    packets: dict[int, Path] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.settings.transfer_steps[self.scenario.family]

    def packet(self, n: int) -> Path:
        """The signed packet carrying the concept table and the first ``n`` pool queries."""
        if n not in self.packets:
            self.packets[n] = self.write_packet(self.scenario.sample(n, seed=self.run), None, tag=str(n))
        return self.packets[n]

    def write_packet(self, probes: list[Example], decomposition: dict[str, Any] | None, *, tag: str = "") -> Path:
        """A signed packet with the concept table, ``probes`` (teacher queries) and a declared decomposition."""
        name = f"{self.scenario.name}-{self.run}-{tag or len(probes)}-{len(self.packets)}.m2kt"
        return write_transfer_packet(
            self.teacher,
            self.anchors + self.scenario.targets,
            probes,
            self.key,
            self.workdir / name,
            topic=scenario_topic(self.scenario.name),
            p=self.world.task.p,
            decomposition=decomposition,
        )

    def record(self, condition: str, budget: Budget | str | None, accuracies: dict[str, float], **fields: Any) -> None:
        for group, acc in accuracies.items():
            teacher = self.teacher_accuracy[group]
            scenario = self.scenario.name if group == self.scenario.name else f"{self.scenario.name}/{group}"
            self.records.append(
                {
                    "scenario": scenario,
                    "condition": condition,
                    "budget": budget_label(budget) if budget is not None else None,
                    "budget_fraction": fields["n"] / len(self.scenario.pool) if condition != "teacher" else None,
                    "pool": len(self.scenario.pool),
                    "test": len(self.scenario.report_groups()[group]),
                    "pair": self.pair.name,
                    "seed": self.run,
                    "accuracy": acc,
                    "pct_of_teacher": 100.0 * acc / teacher if teacher > 0 else None,
                    "device": str(self.device),
                    "student_core": self.core_info,
                    **fields,
                }
            )


def _evaluate_trainee(ctx: Context, trainee: Trainee) -> dict[str, float]:
    return {g: accuracy(trainee, ex) for g, ex in ctx.scenario.report_groups().items()}


def _run_condition(
    ctx: Context,
    condition: str,
    budget: Budget | str,
    *,
    start: str,
    train: Callable[[Trainee, int, PacketContents], dict[str, Any]] | None,
    queries: Callable[[int], int],
    labelled: Callable[[int], int],
    n: int | None = None,
) -> None:
    """Build a trainee, train it (``train`` None: evaluate the start), and record every test group."""
    if n is None:
        assert not isinstance(budget, str)
        n = ctx.scenario.budget(budget)
    path = ctx.packet(n if condition.startswith("m2kt") else 0)
    t0 = time.perf_counter()
    contents = read_packet(path, ctx.key.verify_key)  # verified: digest, signature, finiteness
    trainee = make_trainee(
        ctx.core,
        contents,
        ctx.scenario.targets,
        cal=start,
        adapters=ctx.scenario.adapters,
        device=ctx.device,
        seed=ctx.run,
    )
    try:
        info = train(trainee, n, contents) if train is not None else {}
        accs = _evaluate_trainee(ctx, trainee)
        seconds = time.perf_counter() - t0
    finally:
        trainee.student.detach()
    ctx.record(
        condition,
        budget,
        accs,
        n=n,
        labelled=labelled(n),
        teacher_queries=queries(n),
        concept_vectors=len(contents.labels) + len(contents.extra.get("output_concepts", ())),
        packet_bytes=path.stat().st_size if condition.startswith("m2kt") else None,
        trainable_parameters=trainee.n_trainable(),
        seconds=seconds,
        train=info,
    )


def _m2kt(ctx: Context, mix: LossMix) -> Callable[[Trainee, int, PacketContents], dict[str, Any]]:
    def train(trainee: Trainee, n: int, contents: PacketContents) -> dict[str, Any]:
        return train_m2kt(trainee, contents, mix, steps=ctx.steps, lr=ctx.settings.lr)

    return train


def _outputs(ctx: Context, *, kd: bool) -> Callable[[Trainee, int, PacketContents], dict[str, Any]]:
    def train(trainee: Trainee, n: int, contents: PacketContents) -> dict[str, Any]:
        examples = ctx.scenario.sample(n, seed=ctx.run)
        teacher = ctx.teacher if kd else None
        return train_outputs(trainee, examples, teacher=teacher, steps=ctx.steps, lr=ctx.settings.lr)

    return train


def ablations(trust_region: float) -> dict[str, LossMix]:
    """M2KT with the full composite loss and its probe verifier; without the verifier (the last step is
    kept); and, each without the verifier so that they show what training does, with one loss term removed
    and without the trust region."""
    tr = trust_region
    return {
        "m2kt": LossMix(trust_region=tr),
        "m2kt-no-verifier": LossMix(trust_region=tr, holdout=0.0),
        "m2kt-no-geo": LossMix(geo=0.0, trust_region=tr, holdout=0.0),
        "m2kt-no-struct": LossMix(struct=0.0, trust_region=tr, holdout=0.0),
        "m2kt-no-reason": LossMix(reason=0.0, trust_region=tr, holdout=0.0),
        "m2kt-no-trust-region": LossMix(holdout=0.0),
    }


def _rebind(ctx: Context, budget: Budget, n: int) -> None:
    """Every re-binding condition at this budget (new-operation scenarios)."""
    scenario, template = ctx.scenario, Template(TEMPLATE)
    operands = [str(v) for v in range(ctx.world.task.p)]
    suite = [" ".join(e.tokens) for e in scenario.student_examples][::4]  # the owner's own inputs, no answers
    for name, condition in REBIND_CONDITIONS.items():
        probes = probes_for(
            scenario.pool, n, scenario.sample(n, seed=ctx.run), template, select=condition.select, seed=ctx.run
        )
        out = run_rebind(
            condition=condition,
            teacher=ctx.teacher,
            core=ctx.core,
            probes=probes,
            known=scenario.known,
            operands=operands,
            suite_texts=suite,
            groups=scenario.report_groups(),
            write_packet=lambda probes, decomposition, tag=name: ctx.write_packet(probes, decomposition, tag=tag),
            key=ctx.key,
            template=template,
            device=str(ctx.device),
        )
        ctx.record(
            name,
            budget,
            out["accuracies"],
            n=n,
            labelled=0,
            teacher_queries=out["teacher_queries"],
            concept_vectors=len(ctx.anchors) + len(scenario.targets),
            packet_bytes=out["packet_bytes"],
            trainable_parameters=0,
            student_passes=out["student_passes"],
            seconds=out["seconds"],
            train=out["train"],
        )


def run_scenario(ctx: Context, log: Callable[[str], None]) -> None:
    s = ctx.settings
    none = lambda n: 0  # noqa: E731
    same = lambda n: n  # noqa: E731
    for budget in s.budgets:
        n = ctx.scenario.budget(budget)
        t0 = time.perf_counter()
        if ctx.scenario.operator is not None:
            _rebind(ctx, budget, n)
        with_ablations = ctx.scenario.ablations and s.loss_ablations
        mixes = ablations(s.trust_region) if with_ablations else {"m2kt": ablations(s.trust_region)["m2kt"]}
        for name, mix in mixes.items():
            _run_condition(ctx, name, budget, start="anchor", train=_m2kt(ctx, mix), queries=same, labelled=none)
        _run_condition(ctx, "kd", budget, start="random", train=_outputs(ctx, kd=True), queries=same, labelled=none)
        _run_condition(
            ctx,
            "kd-closed-form-init",
            budget,
            start="anchor",
            train=_outputs(ctx, kd=True),
            queries=same,
            labelled=none,
        )
        _run_condition(
            ctx, "labelled", budget, start="random", train=_outputs(ctx, kd=False), queries=none, labelled=same
        )
        if n > 0:
            _scratch(ctx, budget, n)
        log(f"  {ctx.scenario.name} budget {budget_label(budget)} (N={n}): {time.perf_counter() - t0:.1f} s")
    # zero-query rows: the maps M2KT starts from, and the floor
    for name, start in (("m2kt-zero-shot-anchor", "anchor"), ("m2kt-zero-shot-linear", "linear-ridge")):
        _run_condition(ctx, name, 0, start=start, train=None, queries=none, labelled=none)
    _run_condition(ctx, "floor", 0, start="random", train=None, queries=none, labelled=none)
    _oracle(ctx)


def _scratch(ctx: Context, budget: Budget, n: int) -> None:
    t0 = time.perf_counter()
    examples = ctx.scenario.sample(n, seed=ctx.run)
    model, _ = train_model(
        ctx.world.task,
        ctx.pair.student,
        examples,
        seed=ctx.pair.student_seed + 7,
        steps=ctx.settings.scratch_steps,
        device=str(ctx.device),
    )
    accs = {g: evaluate(model, ex, str(ctx.device)) for g, ex in ctx.scenario.report_groups().items()}
    ctx.record(
        "scratch",
        budget,
        accs,
        n=n,
        labelled=n,
        teacher_queries=0,
        concept_vectors=0,
        packet_bytes=None,
        trainable_parameters=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - t0,
        train={"steps": ctx.settings.scratch_steps},
    )


def _oracle(ctx: Context) -> None:
    """What the frozen core plus the trainable parts can express: labelled training on pool AND test.

    A capacity check, not a method: it fits the test set, so its accuracy is a fit, not held out.
    """
    everything = ctx.scenario.pool + ctx.scenario.test

    def train(trainee: Trainee, n: int, contents: PacketContents) -> dict[str, Any]:
        return train_outputs(trainee, everything, teacher=None, steps=ctx.settings.oracle_steps, lr=ctx.settings.lr)

    _run_condition(
        ctx,
        "oracle",
        "pool+test",
        start="anchor",
        train=train,
        queries=lambda n: 0,
        labelled=lambda n: n,
        n=len(everything),
    )


def run_pair(run: int, settings: Settings, workdir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train one pair's models from scratch and run both scenarios on them."""
    pair = PAIRS[run % len(PAIRS)]
    device = pick_device(settings.device)
    ops = [OpSpec.parse(spec) for spec in settings.scenarios] or list(DEFAULT_OPS)
    world = build_world(settings.p, seed=run, ops=ops, concept=not settings.scenarios)
    log(f"run {run}: {pair.describe()} on {device}")
    t0 = time.perf_counter()
    teacher, tm = train_model(
        world.task,
        pair.teacher,
        world.teacher_train,
        seed=pair.teacher_seed + run,
        steps=settings.model_steps,
        device=str(device),
    )
    log(f"  teacher trained in {tm['seconds']:.1f} s")
    records: list[dict[str, Any]] = []
    key = SigningKey.from_seed(bytes([run % 256]) * 32)
    cores: dict[tuple[str, ...], tuple[TinyTransformer, dict[str, Any]]] = {}  # one per set of known operations
    for scenario in world.scenarios:
        known = tuple(sorted(scenario.known))
        if known not in cores:
            cores[known] = train_core(world, pair, scenario, run, settings, device)
            info = cores[known][1]
            base_test = [e for e in world.test if _same_kind(e, scenario)]
            info["test_accuracy"] = evaluate(cores[known][0], base_test, str(device))
            log(
                f"  student core for {', '.join(known)} trained in {info['seconds']:.1f} s, {info['steps']} steps, "
                f"attempt {info['attempt']}: validation {info['validation_accuracy']:.3f} (gate "
                f"{'passed' if info['passed'] else 'MISSED'}), held-out test {info['test_accuracy']:.3f}"
            )
        core, core_info = cores[known]
        teacher_acc = {g: evaluate(teacher, ex, str(device)) for g, ex in scenario.report_groups().items()}
        ctx = Context(
            run=run,
            pair=pair,
            world=world,
            scenario=scenario,
            teacher=teacher,
            core=core,
            key=key,
            workdir=workdir,
            device=device,
            settings=settings,
            anchors=anchor_tokens(Vocabulary(world.task.vocabulary()), list(scenario.known), world.task.p),
            records=records,
            teacher_accuracy=teacher_acc,
            core_info=core_info,
        )
        ctx.record(
            "teacher",
            None,
            teacher_acc,
            n=len(world.teacher_train),
            labelled=len(world.teacher_train),
            teacher_queries=0,
            concept_vectors=0,
            packet_bytes=None,
            trainable_parameters=sum(p.numel() for p in teacher.parameters()),
            seconds=tm["seconds"],
            train={"steps": tm["steps"]},
        )
        run_scenario(ctx, log)
    log(f"  run {run} done in {time.perf_counter() - t0:.1f} s")
    return records


def train_core(
    world: World, pair: PairShape, scenario: Scenario, run: int, settings: Settings, device: torch.device
) -> tuple[TinyTransformer, dict[str, Any]]:
    """The student's frozen core, trained on its own operations and gated on a held-out share of them.

    A core that misses ``core_target`` after ``core_steps`` is retrained from the next seed, at most
    ``core_attempts`` times; the best one is kept and the record says whether it passed."""
    best: tuple[TinyTransformer, dict[str, Any]] | None = None
    spent = 0.0
    for attempt in range(settings.core_attempts):
        model, metrics = train_model(
            world.task,
            pair.student,
            scenario.student_examples,
            seed=pair.student_seed + run + 1000 * attempt,
            steps=settings.core_steps,
            device=str(device),
            validation=settings.core_validation,
            target=settings.core_target,
        )
        spent += metrics["seconds"]
        validation = float(metrics["test_accuracy"]) if metrics["test_accuracy"] is not None else float("nan")
        info = {
            "attempt": attempt + 1,
            "steps": metrics["steps"],
            "validation_accuracy": validation,
            "validation_examples": metrics["n_test"],
            "passed": validation >= settings.core_target,
        }
        if best is None or validation > best[1]["validation_accuracy"]:
            best = (model, info)
        if info["passed"]:
            break
    assert best is not None
    return best[0], {**best[1], "seconds": spent, "attempts": attempt + 1}


def _same_kind(example: Example, scenario: Scenario) -> bool:
    """A held-out example of the student's own base skill (its operators, plain numbers)."""
    ops = {e.operator for e in scenario.student_examples}
    return example.operator in ops and all(not t.endswith("'") for t in example.tokens)


def run_benchmark(
    settings: Settings, out: Path, log: Callable[[str], None] = print, *, command: str = "m2kt bench transfer"
) -> dict[str, Any]:
    """All runs, then the table, JSON and plot under ``out``; returns the JSON document.

    The outputs are rewritten after every run, marked ``"complete": false`` until the last one, so a long run
    that is stopped keeps what it measured."""
    started = time.perf_counter()
    records: list[dict[str, Any]] = []

    def document(runs: int) -> dict[str, Any]:
        return {
            "command": command,
            "settings": asdict(settings),
            "complete": runs == settings.seeds,
            "runs_done": runs,
            "environment": {
                "device": str(pick_device(settings.device)),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "seconds": time.perf_counter() - started,
            },
            "pairs": [PAIRS[i % len(PAIRS)].describe() for i in range(runs)],
            "records": records,
        }

    with tempfile.TemporaryDirectory(prefix="m2kt-bench-") as tmp:
        for run in range(settings.seeds):
            records += run_pair(run, settings, Path(tmp), log)
            if run + 1 < settings.seeds:
                write_outputs(document(run + 1), out, lambda line: None)
                log(f"  outputs after {run + 1} of {settings.seeds} run(s) written to {out} (partial)")
    return write_outputs(document(settings.seeds), out, log)


def parse_budgets(text: str) -> list[Budget]:
    """``"0,8,32,2%,100%"`` → ``[0, 8, 32, 0.02, 1.0]``: counts of queries, or percentages of the pool."""
    budgets: list[Budget] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            budget: Budget = float(item[:-1]) / 100 if item.endswith("%") else int(item)
        except ValueError:
            raise ValueError(f"budget {item!r}: a count of queries (8) or a percentage of the pool (2%)") from None
        if budget < 0 or (isinstance(budget, float) and not 0 < budget <= 1):
            raise ValueError(f"budget {item!r}: counts are >= 0, percentages in (0%, 100%]")
        budgets.append(budget)
    if not budgets:
        raise ValueError("--budgets needs at least one budget")
    return budgets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2kt bench transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run, fewer budgets (under 10 minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, default=None, help="runs (pair i mod 3, seed i); default 3, quick 1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where table, JSON, plot go")
    parser.add_argument("--p", type=int, default=23, help="the modulus (vocabulary and task size)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME=KNOWN:EXPR",
        help="a new-operation scenario, e.g. a-2b=add,sub:a-2*b, or a default one by name (skill, composition); "
        "repeat; replaces the default scenarios",
    )
    parser.add_argument("--budgets", default=None, help="e.g. 0,8,32,2%%,100%%: query counts or shares of the pool")
    parser.add_argument(
        "--no-loss-ablations", action="store_true", help="skip the composite-loss ablations (m2kt-no-geo, ...)"
    )
    args = parser.parse_args(argv)
    try:
        for spec in args.scenario:
            OpSpec.parse(spec)
        budgets = parse_budgets(args.budgets) if args.budgets is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    overrides: dict[str, Any] = {"p": args.p, "device": args.device, "scenarios": list(args.scenario)}
    if budgets is not None:
        overrides["budgets"] = budgets
    if args.no_loss_ablations:
        overrides["loss_ablations"] = False
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        overrides["seeds"] = args.seeds
    settings = Settings.quick_run(**overrides) if args.quick else Settings(**overrides)
    command = " ".join(["m2kt bench transfer", *(sys.argv[1:] if argv is None else argv)])
    run_benchmark(settings, args.out, lambda line: print(line, flush=True), command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
