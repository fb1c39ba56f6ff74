"""Algorithm 2: a verified packet in, a student that knows more (or exactly as much as before) out.

    report = ingest(student, "arith.m2kt", IngestConfig(targets=["token:plus"]), keys=teacher_pub, suite=suite)

One function per step, each usable on its own:

1. :func:`~m2kt.student.probing.read_packet` verifies and reads the packet (nothing unpickled);
   :func:`prepare` probes the student for its own c^S_k on the packet's probe inputs, chooses targets and
   anchors and splits off held-out anchors;
2. :func:`checkpoint` — what a rollback restores, bit for bit;
3. :func:`build_training` — the CAL from the shared anchors (closed form or anchor-relative: zero-shot),
   adapters, and the :class:`~m2kt.student.training.CALTrainer` with this packet's loss inputs;
4. :func:`train` — steps of the composite loss with early stopping on the held-out anchors; the best
   state seen is kept (the zero-shot map when training never beat it); the core stays frozen;
5. :func:`audit_ingestion` — the verifier and safety auditor on the owner's probe suite;
6. :func:`rollback` — on degradation, a safety hit, an error or an interrupt.

The result is an :class:`~m2kt.student.report.IngestReport`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2kt.errors import IngestError
from m2kt.format.keys import VerifyKey
from m2kt.nn.device import pick_device
from m2kt.nn.select import select
from m2kt.student.cal import build_cal
from m2kt.student.checkpoint import Checkpoint, checkpoint, rollback
from m2kt.student.config import IngestConfig
from m2kt.student.losses import LossTerms, align_depth, geo_loss, pool_attention_to
from m2kt.student.mapping import ingest_by_alignment
from m2kt.student.probing import PacketContents, StudentProbe, probe_student, read_packet
from m2kt.student.rebind import ingest_by_rebinding
from m2kt.student.report import IngestReport, outcome_fields
from m2kt.student.student import Student
from m2kt.student.training import CALTrainer, project_to_trust_region
from m2kt.student.verifier import Check, ProbeSuite, Snapshot, audit, decide, flagged_directions, snapshot

__all__ = [
    "Checkpoint",
    "IngestError",
    "Prepared",
    "Training",
    "TrainResult",
    "audit_ingestion",
    "build_training",
    "checkpoint",
    "ingest",
    "prepare",
    "project_to_trust_region",
    "rollback",
    "train",
]

Progress = Callable[[int, int, LossTerms], None]


# ----------------------------------------------------------------------------------------- 1. prepare


@dataclass
class Prepared:
    """A verified packet read into torch, and the student's own view of it."""

    contents: PacketContents
    device: torch.device
    layer: str  # the student layer c^S_k is read at
    probe: StudentProbe
    targets: list[int]  # concept rows to inject
    train: list[int]  # anchor rows the CAL is fitted on
    holdout: list[int]  # anchor rows for early stopping
    target_tokens: list[int]  # student token ids of the targets (token injection)

    @property
    def anchors(self) -> list[int]:
        return sorted(self.train + self.holdout)

    def labels(self, rows: Sequence[int]) -> list[str]:
        return [self.contents.labels[i] for i in rows]


def _token_id(student: Student, token: str) -> int:
    batch = student.reader.tokenize([token])
    if batch.lengths[0] == 1:
        return int(batch.input_ids[0, 0])
    return student.reader.output_token_id(token)


def _choose(contents: PacketContents, config: IngestConfig, has_probes: torch.Tensor) -> tuple[list[int], list[int]]:
    labels = contents.labels
    missing = [t for t in config.targets + list(config.anchors or ()) if t not in labels]
    if missing:
        raise IngestError(f"the packet has no concept(s) {', '.join(missing)}; it has: {', '.join(labels[:20])}")
    targets = [labels.index(t) for t in config.targets]
    if config.anchors is not None:
        anchors = [labels.index(a) for a in config.anchors]
    else:
        anchors = [i for i in range(len(labels)) if i not in targets]
    no_probe = [labels[i] for i in anchors if not bool(has_probes[i])]
    if config.anchors is not None and no_probe:
        raise IngestError(f"anchor concept(s) without probe inputs: {', '.join(no_probe)}")
    anchors = [i for i in anchors if bool(has_probes[i])]
    if not anchors:
        raise IngestError("no anchor concepts: the student needs concepts it can probe itself to align with")
    if config.inject.mode == "token":
        bad = [labels[i] for i in targets if not labels[i].startswith("token:")]
        if bad:
            raise IngestError(f"token injection needs targets labelled 'token:<t>'; not: {', '.join(bad)}")
    return targets, anchors


def prepare(student: Student, contents: PacketContents, config: IngestConfig) -> Prepared:
    """Move the student to the config's device and probe it on a verified packet's contents
    (:func:`~m2kt.student.probing.read_packet`); sets the inject layer, changes no trainable state."""
    device = pick_device(config.device)
    student.to(device)
    torch.manual_seed(config.seed)
    layer = config.layer or config.inject.layer
    student.reader.layer_module(layer)
    if config.inject.mode == "token":
        student.set_inject_layer(config.inject.layer)
    probe = probe_student(student, contents, layer, config.batch_size)
    targets, anchors = _choose(contents, config, probe.has_probes)
    target_tokens = (
        [_token_id(student, contents.labels[i][len("token:") :]) for i in targets]
        if config.inject.mode == "token"
        else []
    )
    order = list(anchors)
    random.Random(config.seed).shuffle(order)
    # early stopping needs held-out anchors; with no training steps none are held out
    n_hold = int(round(len(order) * config.holdout_fraction)) if len(order) > 2 and config.steps > 0 else 0
    return Prepared(
        contents=contents,
        device=device,
        layer=layer,
        probe=probe,
        targets=targets,
        train=sorted(order[n_hold:]),
        holdout=sorted(order[:n_hold]),
        target_tokens=target_tokens,
    )


# ----------------------------------------------------------------------------------------- 3. training set-up


@dataclass
class Training:
    """The parts an ingestion trains, the trainer, and the loss inputs of one step."""

    trainer: CALTrainer
    trainable: int  # parameters
    teacher_c: torch.Tensor  # (K, d_T)
    student_c: torch.Tensor  # (K, d_S)
    origin: torch.Tensor  # (d_S,) mean of the student's anchor concepts (centres the safety cosines)
    flagged: torch.Tensor  # (F, d_S) the suite's flagged directions in the student's space
    flagged_labels: list[str]
    inputs: Callable[[torch.Tensor], dict[str, Any]]  # mapped (K, d_S) -> CompositeLoss arguments
    inject: Callable[[torch.Tensor], None]
    mixed_precision: bool
    notes: list[str] = field(default_factory=list)


def build_training(student: Student, prep: Prepared, config: IngestConfig, suite: ProbeSuite) -> Training:
    """Fit the CAL in closed form from the training anchors, add adapters, and build the step's loss inputs."""
    contents, device = prep.contents, prep.device
    flagged_labels, flagged = flagged_directions(student, suite, prep.layer)
    teacher_c = contents.concepts.to(device)  # (K, d_T)
    student_c = prep.probe.concepts.to(device)  # (K, d_S)
    origin = prep.probe.concepts[prep.anchors].mean(0)  # (d_S,)
    cal = build_cal(
        config.cal,
        teacher_c.shape[1],
        student_c.shape[1],
        anchors_teacher=teacher_c[prep.train],
        anchors_student=student_c[prep.train],
    ).to(device)
    student.cal = cal
    student.meta = {
        "cal": config.cal.to_json(),
        "d_teacher": teacher_c.shape[1],
        "d_student": student_c.shape[1],
        "n_anchors": len(prep.train),
        "packet": contents.id,
    }
    if config.adapter.enabled:
        student.add_adapters(config.adapter.layers or [student.reader.layer_names[-1]], config.adapter.rank)
    params = student.trainable_parameters()
    flagged_dev = (flagged.to(device) - origin.to(device)) if len(flagged) else None
    targets, train_rows = prep.targets, prep.train
    notes: list[str] = []

    # inputs for the structure and reasoning terms: a fixed sample of probes, run with injection each step
    uses_probes = (config.loss.struct > 0 and contents.attention is not None) or (
        config.loss.reason > 0 and contents.traces is not None
    )
    rows = _probe_rows(contents, targets + train_rows, config.batch_size, config.seed) if uses_probes else []
    batch = student.reader.tokenize([contents.texts[r] for r in rows]) if rows else None
    use_amp = config.amp and device.type == "cuda"
    autocast: Callable[[], AbstractContextManager[Any]] = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    )

    def inject(mapped: torch.Tensor) -> None:
        if config.inject.mode == "token":
            student.injector.set(prep.target_tokens, prep.labels(targets), mapped[targets])

    def probe_terms(mapped: torch.Tensor) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if batch is None:
            return extra
        ids, mask = batch.slice(0, len(batch), device)
        with autocast():
            capture = student.forward(ids, mask, attention=config.loss.struct > 0, grad=True)
        if config.loss.struct > 0 and contents.attention is not None and capture.attentions is not None:
            teacher_att = contents.attention
            if teacher_att.shape[0] == len(contents.labels):  # per concept: each probe gets its concept's map
                teacher_att = teacher_att[contents.members[rows].clamp_min(0)]
            else:
                teacher_att = teacher_att[rows]
            t_att = pool_attention_to(teacher_att.to(device))  # (N, L_T, L_T)
            s_att = pool_attention_to(torch.stack(capture.attentions, dim=1).float())  # (N, T, T)
            width = s_att.shape[-1]
            if t_att.shape[-1] >= width:
                extra.update(teacher_attention=t_att[:, :width, :width], student_attention=s_att, attention_mask=mask)
            elif not any(n.startswith("struct:") for n in notes):
                notes.append("struct: teacher attention narrower than the student's inputs; term skipped")
        if config.loss.reason > 0 and contents.traces is not None:
            positions = [prep.probe.positions[r] for r in rows]
            s_tr = torch.stack(
                [select(capture.hidden[name].float(), mask, positions) for name in student.reader.layer_names], dim=1
            )  # (N, m_S, d_S)
            t_tr = contents.traces[rows].to(device)  # (N, m_T, d_T)
            extra.update(
                teacher_traces=t_tr,
                teacher_concepts=teacher_c,
                student_traces=align_depth(s_tr, t_tr.shape[1]),
                student_concepts=mapped,
            )
        return extra

    def inputs(mapped: torch.Tensor) -> dict[str, Any]:
        inject(mapped)
        args: dict[str, Any] = {"mapped": mapped[train_rows], "target": student_c[train_rows], **probe_terms(mapped)}
        if flagged_dev is not None:  # L_safety on what would enter the student
            watched = mapped[targets] if targets else mapped
            args.update(safety_mapped=watched - origin.to(device), flagged=flagged_dev)
        return args

    trainer = CALTrainer(
        cal,
        params,
        config.loss,
        lr=config.lr,
        teacher_concepts=teacher_c,
        trust_region=config.trust_region,
        trust_rows=targets or prep.anchors,
    )
    return Training(
        trainer=trainer,
        trainable=sum(p.numel() for p in params),
        teacher_c=teacher_c,
        student_c=student_c,
        origin=origin,
        flagged=flagged,
        flagged_labels=flagged_labels,
        inputs=inputs,
        inject=inject,
        mixed_precision=use_amp,
        notes=notes,
    )


def _probe_rows(contents: PacketContents, concepts: Sequence[int], size: int, seed: int) -> list[int]:
    """A fixed sample of probe rows belonging to ``concepts`` (the student runs these each step)."""
    rows = [p for p in range(len(contents.texts)) if int(contents.members[p]) in set(concepts)]
    random.Random(seed).shuffle(rows)
    return sorted(rows[:size])


# ----------------------------------------------------------------------------------------- 4. train


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    zero_shot_holdout_geo: float | None
    best_step: int
    steps_run: int
    final: torch.Tensor  # (K, d_S) the mapped concepts that were kept


def train(
    student: Student, prep: Prepared, training: Training, config: IngestConfig, progress: Progress | None = None
) -> TrainResult:
    """Train with early stopping on the held-out anchors, then keep (and inject) the best state seen."""
    trainer, student_c, holdout = training.trainer, training.student_c, prep.holdout
    held_zero = float(geo_loss(trainer.zero_shot[holdout], student_c[holdout])) if holdout else None
    best = (held_zero if held_zero is not None else float("inf"), student.trainable_state(), -1)
    history: list[dict[str, Any]] = []
    stale = steps_run = 0
    for step in range(config.steps if trainer.can_train else 0):
        terms = trainer.step(training.inputs)
        steps_run = step + 1
        mapped = trainer.mapped()
        held = float(geo_loss(mapped[holdout], student_c[holdout])) if holdout else float(terms.total)
        history.append({"step": step, **terms.as_dict(), "holdout_geo": held if holdout else None})
        if progress is not None:
            progress(step + 1, config.steps, terms)
        if held < best[0] - 1e-9:
            best = (held, student.trainable_state(), step)
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    student.restore(best[1], ([], []))
    final = trainer.mapped()
    training.inject(final)
    return TrainResult(history, held_zero, best[2], steps_run, final)


# ----------------------------------------------------------------------------------------- 5. audit


def audit_ingestion(
    student: Student,
    prep: Prepared,
    training: Training,
    result: TrainResult,
    before: Snapshot,
    suite: ProbeSuite,
    config: IngestConfig,
) -> tuple[Snapshot, list[Check]]:
    """The suite after training, and every check of the verifier and safety auditor."""
    after = snapshot(student, suite)
    checks = audit(
        before,
        after,
        config=config.verifier,
        mapped=result.final[prep.targets].cpu(),
        mapped_labels=prep.labels(prep.targets),
        flagged_labels=training.flagged_labels,
        flagged=training.flagged,
        origin=training.origin,
    )
    return after, checks


# ----------------------------------------------------------------------------------------- the algorithm


def ingest(
    student: Student,
    packet: str | Path,
    config: IngestConfig,
    *,
    keys: VerifyKey | Sequence[VerifyKey],
    suite: ProbeSuite | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest ``packet`` into ``student`` per ``config``: accepted, or rolled back to the exact previous state."""
    t0 = time.perf_counter()
    suite = suite or ProbeSuite()
    contents = read_packet(packet, keys)  # verified before anything is read from it
    if config.rebind.enabled:
        return ingest_by_rebinding(student, contents, config, suite, started=t0)
    if config.alignment.enabled or not student.reader.has_logits:  # an encoder: concepts by their vectors
        return ingest_by_alignment(student, contents, config, suite, started=t0)
    inject_layer = student.inject_layer
    t_probe = time.perf_counter()
    try:
        prep = prepare(student, contents, config)
    except BaseException:
        if student.inject_layer != inject_layer:
            student.set_inject_layer(inject_layer)
        raise
    saved = checkpoint(student, inject_layer=inject_layer)
    try:
        before = snapshot(student, suite)
        training = build_training(student, prep, config, suite)
        probe_seconds = time.perf_counter() - t_probe
        t_train = time.perf_counter()
        result = train(student, prep, training, config, progress)
        train_seconds = time.perf_counter() - t_train
        t_verify = time.perf_counter()
        after, checks = audit_ingestion(student, prep, training, result, before, suite, config)
        accepted = decide(checks)
    except BaseException:  # an error or interrupt mid-ingestion leaves the student as it was
        rollback(student, saved)
        raise
    if not accepted:
        rollback(student, saved)
    verify_seconds = time.perf_counter() - t_verify
    timings: dict[str, float | None] = {
        "read": t_probe - t0,
        "probe": probe_seconds,
        "train": train_seconds,
        "verify": verify_seconds,
        "total": time.perf_counter() - t0,
        "steps_per_second": result.steps_run / train_seconds if train_seconds > 0 else None,
    }
    return _report(student, prep, training, result, config, suite, (before, after, checks, accepted), timings)


def _report(
    student: Student,
    prep: Prepared,
    training: Training,
    result: TrainResult,
    config: IngestConfig,
    suite: ProbeSuite,
    outcome: tuple[Snapshot, Snapshot, list[Check], bool],
    timings: dict[str, float | None],
) -> IngestReport:
    before, after, checks, accepted = outcome
    m = prep.contents.manifest
    return IngestReport(
        **outcome_fields(prep.contents.id, m, checks, accepted),
        probe_scores={
            "before": before.task_score if before.task_score is not None else (1.0 if before.predictions else None),
            "after": after.task_score
            if after.task_score is not None
            else next((c.value for c in checks if c.name == "task"), None),
            "measure": "accuracy" if suite.answers is not None else "agreement with the student before ingestion",
        },
        injected=prep.labels(prep.targets) if accepted else [],
        anchors={"train": prep.labels(prep.train), "holdout": prep.labels(prep.holdout)},
        losses=result.history,
        zero_shot_holdout_geo=result.zero_shot_holdout_geo,
        best_step=result.best_step,
        steps_run=result.steps_run,
        stopped_early=result.steps_run < config.steps,
        trainable_parameters=training.trainable,
        notes=training.notes,
        data_usage={
            "teacher_queries": m.data_usage.probe_count,
            "labelled_examples": m.data_usage.labelled_examples,
            "verifier_labelled_examples": suite.labelled,
            "student_probe_passes": prep.probe.passes,
        },
        device=str(prep.device),
        mixed_precision="bfloat16" if training.mixed_precision else None,
        timings=timings,
        config=config.to_json(),
        student={"core_sha256": student.core_sha256, "layer": prep.layer, "inject_layer": student.inject_layer},
    )
