"""Algorithm 2: a verified packet in, a student that knows more (or exactly as much as before) out.

    report = ingest(student, "arith.m2kt", IngestConfig(targets=["token:plus"]), keys=teacher_pub, suite=suite)

1. verify and read the packet (:func:`client.student.probing.read_packet`; nothing unpickled);
2. probe the student for its own c^S_k on the packet's probe inputs;
3. build the CAL from the shared anchor concepts (closed form or anchor-relative: zero-shot);
4. train the CAL and adapters on the composite loss, with early stopping on held-out anchors
   and an optional trust region around the zero-shot map; the core stays frozen;
5. verify and audit with the owner's probe suite; on degradation or a safety hit, roll back to
   the exact pre-ingestion state. The report (JSON-ready dict) says what happened and why.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from client.keys import VerifyKey
from client.student.cal import build_cal
from client.student.config import IngestConfig
from client.student.losses import CompositeLoss, LossTerms, align_depth, geo_loss, pool_attention_to, safety_loss
from client.student.probing import PacketContents, probe_student, read_packet
from client.student.student import Student
from client.student.verifier import ProbeSuite, audit, flagged_directions, snapshot
from client.teacher.adapters import pick_device
from client.teacher.probing import select

__all__ = ["IngestError", "ingest", "project_to_trust_region"]


class IngestError(ValueError):
    """The packet and the config or student do not fit together (nothing was changed)."""


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


def _probe_batch(contents: PacketContents, concepts: Sequence[int], size: int, seed: int) -> list[int]:
    """A fixed sample of probe rows belonging to ``concepts`` (the student runs these each step)."""
    rows = [p for p in range(len(contents.texts)) if int(contents.members[p]) in set(concepts)]
    random.Random(seed).shuffle(rows)
    return sorted(rows[:size])


def ingest(
    student: Student,
    packet: str | Path,
    config: IngestConfig,
    *,
    keys: VerifyKey | Sequence[VerifyKey],
    suite: ProbeSuite | None = None,
    progress: Callable[[int, int, LossTerms], None] | None = None,
) -> dict[str, Any]:
    """Ingest ``packet`` into ``student`` per ``config``; returns the ingestion report."""
    t0 = time.perf_counter()
    suite = suite or ProbeSuite()
    contents = read_packet(packet, keys)
    device = pick_device(config.device)
    student.to(device)
    torch.manual_seed(config.seed)
    layer = config.layer or config.inject.layer
    student.reader.layer_module(layer)
    if config.inject.mode == "token":
        student.set_inject_layer(config.inject.layer)
    t_probe = time.perf_counter()
    probe = probe_student(student, contents, layer, config.batch_size)
    targets, anchors = _choose(contents, config, probe.has_probes)
    target_tokens = (
        [_token_id(student, contents.labels[i][len("token:") :]) for i in targets]
        if (config.inject.mode == "token")
        else []
    )
    order = list(anchors)
    random.Random(config.seed).shuffle(order)
    n_hold = int(round(len(order) * config.holdout_fraction)) if len(order) > 2 else 0
    holdout, train = sorted(order[:n_hold]), sorted(order[n_hold:])

    # ---- the pre-ingestion checkpoint (what a rollback restores, bit for bit)
    previous_cal = copy.deepcopy(student.cal)
    previous_adapters = set(student.adapters.keys())
    previous_state = student.trainable_state()
    previous_injection = (list(student.injector.token_ids), list(student.injector.labels))
    before = snapshot(student, suite)
    flagged_labels, flagged = flagged_directions(student, suite, layer)
    probe_seconds = time.perf_counter() - t_probe

    teacher_c = contents.concepts.to(device)  # (K, d_T)
    student_c = probe.concepts.to(device)  # (K, d_S)
    origin = probe.concepts[anchors].mean(0)  # (d_S,)
    cal = build_cal(
        config.cal,
        teacher_c.shape[1],
        student_c.shape[1],
        anchors_teacher=teacher_c[train],
        anchors_student=student_c[train],
    ).to(device)
    student.cal = cal
    previous_meta = dict(student.meta)
    student.meta = {
        "cal": config.cal.to_json(),
        "d_teacher": teacher_c.shape[1],
        "d_student": student_c.shape[1],
        "n_anchors": len(train),
        "packet": contents.id,
    }
    if config.adapter.enabled:
        student.add_adapters(config.adapter.layers or [student.reader.layer_names[-1]], config.adapter.rank)
    params = student.trainable_parameters()
    trainable = sum(p.numel() for p in params)
    loss_fn = CompositeLoss(config.loss)
    flagged_dev = (flagged.to(device) - origin.to(device)) if len(flagged) else None

    # inputs for the structure and reasoning terms: a fixed sample of probes, run with injection each step
    uses_probes = (config.loss.struct > 0 and contents.attention is not None) or (
        config.loss.reason > 0 and contents.traces is not None
    )
    rows = _probe_batch(contents, targets + train, config.batch_size, config.seed) if uses_probes else []
    notes: list[str] = []
    batch = student.reader.tokenize([contents.texts[r] for r in rows]) if rows else None
    use_amp = config.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext

    def inject(mapped: torch.Tensor) -> None:
        if config.inject.mode == "token":
            student.injector.set(target_tokens, [contents.labels[i] for i in targets], mapped[targets])

    def step_inputs(mapped: torch.Tensor) -> dict[str, Any]:
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
            elif "struct" not in notes:
                notes.append("struct: teacher attention narrower than the student's inputs; term skipped")
        if config.loss.reason > 0 and contents.traces is not None:
            positions = [probe.positions[r] for r in rows]
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

    def rollback() -> None:
        """Back to the exact pre-ingestion state: CAL, adapters, injection, metadata."""
        student.cal = previous_cal
        for key in list(student.adapters.keys()):
            if key not in previous_adapters:
                del student.adapters[key]
        student._install()
        student.restore(previous_state, previous_injection)
        student.meta = previous_meta

    try:
        # ---- training
        t_train = time.perf_counter()
        with torch.no_grad():
            zero_shot = cal(teacher_c).detach()  # (K, d_S)
        zero_state = {k: v.detach().clone() for k, v in cal.state_dict().items()}
        held_zero = float(geo_loss(zero_shot[holdout], student_c[holdout])) if holdout else None
        best = (held_zero if held_zero is not None else float("inf"), student.trainable_state(), -1)
        history: list[dict[str, float]] = []
        optimizer = torch.optim.Adam(params, lr=config.lr) if params else None
        stale = 0
        steps_run = 0
        for step in range(config.steps if optimizer else 0):
            mapped = cal(teacher_c)  # (K, d_S)
            inject(mapped)
            extra = step_inputs(mapped)
            total, terms = loss_fn(mapped=mapped[train], target=student_c[train], **extra)
            if flagged_dev is not None and config.loss.safety > 0:  # L_safety on what would enter the student
                watched = mapped[targets] if targets else mapped
                penalty = safety_loss(watched - origin.to(device), flagged_dev, config.loss.safety_margin)
                total = total + config.loss.safety * penalty
                terms = LossTerms(
                    terms.geo,
                    terms.struct,
                    terms.reason,
                    float(penalty.detach()),
                    terms.total + config.loss.safety * float(penalty.detach()),
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if config.trust_region is not None:
                project_to_trust_region(cal, zero_state, zero_shot, teacher_c, targets or anchors, config.trust_region)
            steps_run = step + 1
            with torch.no_grad():
                mapped = cal(teacher_c)
                held = float(geo_loss(mapped[holdout], student_c[holdout])) if holdout else float(terms.total)
            record = {"step": step, **terms.as_dict(), "holdout_geo": held if holdout else None}
            history.append(record)
            if progress is not None:
                progress(step + 1, config.steps, terms)
            if held < best[0] - 1e-9:
                best = (held, student.trainable_state(), step)
                stale = 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        # keep the best CAL/adapters seen on the held-out anchors (the zero-shot map if training never beat it)
        student.restore(best[1], ([], []))
        with torch.no_grad():
            final = cal(teacher_c).detach()
        inject(final)
        train_seconds = time.perf_counter() - t_train

        # ---- verify and audit
        t_verify = time.perf_counter()
        after = snapshot(student, suite)
        checks = audit(
            before,
            after,
            config=config.verifier,
            mapped=final[targets].cpu(),
            mapped_labels=[contents.labels[i] for i in targets],
            flagged_labels=flagged_labels,
            flagged=flagged,
            origin=origin,
        )
        accepted = all(c.passed for c in checks)
    except BaseException:  # an error or interrupt mid-ingestion leaves the student as it was
        rollback()
        raise
    if not accepted:
        rollback()
    verify_seconds = time.perf_counter() - t_verify

    m = contents.manifest
    return {
        "packet": {
            "id": contents.id,
            "topic": m.topic,
            "teacher": m.teacher.model_name,
            "concepts": len(m.concepts),
            "data_usage": m.data_usage.model_dump(),
        },
        "decision": "accepted" if accepted else "rolled_back",
        "reasons": [c.detail for c in checks if not c.passed],
        "checks": [c.as_dict() for c in checks],
        "probe_scores": {
            "before": before.task_score if before.task_score is not None else (1.0 if before.predictions else None),
            "after": after.task_score
            if after.task_score is not None
            else next((c.value for c in checks if c.name == "task"), None),
            "measure": "accuracy" if suite.answers is not None else "agreement with the student before ingestion",
        },
        "injected": [contents.labels[i] for i in targets] if accepted else [],
        "anchors": {"train": [contents.labels[i] for i in train], "holdout": [contents.labels[i] for i in holdout]},
        "losses": history,
        "zero_shot_holdout_geo": held_zero,
        "best_step": best[2],
        "steps_run": steps_run,
        "stopped_early": steps_run < config.steps,
        "trainable_parameters": trainable,
        "notes": notes,
        "data_usage": {
            "teacher_queries": m.data_usage.probe_count,
            "labelled_examples": m.data_usage.labelled_examples,
            "verifier_labelled_examples": suite.labelled,
            "student_probe_passes": probe.passes,
        },
        "device": str(device),
        "mixed_precision": "bfloat16" if use_amp else None,
        "timings": {
            "probe": probe_seconds,
            "train": train_seconds,
            "verify": verify_seconds,
            "total": time.perf_counter() - t0,
            "steps_per_second": steps_run / train_seconds if train_seconds > 0 else None,
        },
        "config": config.to_json(),
        "student": {"core_sha256": student.core_sha256, "layer": layer, "inject_layer": student.inject_layer},
    }


def project_to_trust_region(
    cal: torch.nn.Module,
    zero_state: dict[str, torch.Tensor],
    zero_shot: torch.Tensor,
    teacher_c: torch.Tensor,
    rows: Sequence[int],
    radius: float,
) -> None:
    """Trust region: pull the CAL back toward its zero-shot parameters until the mapped concepts
    move at most ``radius`` (relative) from the zero-shot map — by interpolating parameters."""
    with torch.no_grad():
        moved = cal(teacher_c)[list(rows)]
        base = zero_shot[list(rows)]
        distance = float((moved - base).norm() / base.norm().clamp_min(1e-12))
        if distance <= radius:
            return
        scale = radius / distance
        for name, tensor in cal.state_dict().items():
            if tensor.is_floating_point() and name in zero_state:
                tensor.copy_(zero_state[name] + scale * (tensor - zero_state[name]))
