"""The student side: every condition trains the same parameters of the same frozen student.

The trainable set of a scenario is fixed: a Concept Alignment Layer whose outputs for the target
tokens are injected at the student's token embedding (``embed.tok``), plus — for skill transfer —
zero-initialised residual adapters after every block. Conditions differ only in where the CAL
starts and what signal trains it:

* **M2KT** — the packet only (0 labels): L_geo on the shared anchor tokens, L_struct between the
  teacher's and the student's attention on the packet's probes, L_reason between the concept-
  similarity distributions along the teacher's and the student's traces (the concepts being each
  model's own output rows, so the last step is output-level consistency). Starts from the
  anchor-relative map. Ablations drop one term each.
* **KD** — KL to the teacher's output distribution on the same N queries (the teacher is run).
* **labelled** — cross-entropy on N ground-truth answers (0 teacher queries).

All of them run on the Student wrapper of :mod:`m2kt.student` (frozen core, injector, adapters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from m2kt.student import CALConfig, Student
from m2kt.student.cal import build_cal
from m2kt.student.losses import LossWeights, pool_attention_to
from m2kt.student.probing import PacketContents
from m2kt.student.training import CALTrainer
from m2kt.toy.model import TinyTransformer
from m2kt.toy.symbolic import Example, Vocabulary
from m2kt.toy.train import encode_batch, encode_examples

__all__ = ["LossMix", "Trainee", "accuracy", "make_trainee", "train_m2kt", "train_outputs"]


@dataclass(frozen=True)
class LossMix:
    """Weights of the M2KT composite loss (0 removes a term)."""

    geo: float = 1.0
    struct: float = 1.0
    reason: float = 1.0
    reason_temperature: float = 0.1
    trust_region: float | None = None  # max relative move of the injected targets from the zero-shot map
    # the verifier's share of the packet's probes: held out of training, the state (the zero-shot map
    # included) whose answers agree most with the teacher's answers to them is kept; 0 keeps the last step
    holdout: float = 0.25
    check_every: int = 10


@dataclass
class Trainee:
    """A frozen student core with this scenario's trainable parts, ready for one condition."""

    student: Student
    cal: torch.nn.Module
    teacher_concepts: torch.Tensor  # (K, d_T) from the packet
    student_concepts: torch.Tensor  # (K, d_S) the student's own rows for the same tokens
    target_rows: list[int]  # rows of the concept table that are injected
    anchor_rows: list[int]
    target_ids: list[int]  # student token ids of the targets
    device: torch.device

    def inject(self) -> torch.Tensor:
        """Map every concept, inject the targets (with grad while training); returns the mapped table."""
        mapped = self.cal(self.teacher_concepts)  # (K, d_S)
        self.inject_mapped(mapped)
        return mapped

    def inject_mapped(self, mapped: torch.Tensor) -> None:
        """Inject the target rows of an already mapped concept table (K, d_S)."""
        labels = [f"token:{i}" for i in self.target_ids]
        self.student.injector.set(self.target_ids, labels, mapped[self.target_rows])

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in [*self.cal.parameters(), *self.student.adapters.parameters()] if p.requires_grad]

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


def make_trainee(
    core: TinyTransformer,
    contents: PacketContents,
    targets: Sequence[str],
    *,
    cal: str,
    adapters: bool,
    device: torch.device,
    seed: int,
    adapter_rank: int = 16,
) -> Trainee:
    """A fresh Student on (a reference to) ``core`` with a CAL of kind ``cal``: ``anchor`` (the
    anchor-relative map), ``linear-ridge`` (the closed-form L_geo minimiser) or ``random``."""
    vocab = Vocabulary(core.config.vocab)
    student = Student(core)
    student.set_inject_layer("embed.tok")
    student.to(device)
    tokens = [label.removeprefix("token:") for label in contents.labels]
    target_rows = [tokens.index(t) for t in targets]
    anchor_rows = [i for i in range(len(tokens)) if i not in target_rows]
    own = core.embed.tok.weight.detach()[[vocab.id(t) for t in tokens]].to(device)  # (K, d_S)
    teacher = contents.concepts.to(device)  # (K, d_T)
    torch.manual_seed(seed)
    if cal == "anchor":
        config = CALConfig(kind="anchor")
    elif cal == "linear-ridge":
        config = CALConfig(kind="linear", init="ridge")
    elif cal == "random":
        config = CALConfig(kind="linear", init="none")
    else:
        raise ValueError(f"unknown CAL start {cal!r}")
    layer = build_cal(
        config, teacher.shape[1], own.shape[1], anchors_teacher=teacher[anchor_rows], anchors_student=own[anchor_rows]
    ).to(device)
    student.cal = layer
    if adapters:
        student.add_adapters([f"blocks.{i}" for i in range(core.config.n_layers)], adapter_rank)
    trainee = Trainee(
        student, layer, teacher, own, target_rows, anchor_rows, [vocab.id(t) for t in targets], device=device
    )
    with torch.no_grad():
        trainee.inject()
    return trainee


def _logits(trainee: Trainee, ids: torch.Tensor, mask: torch.Tensor, *, grad: bool) -> torch.Tensor:
    capture = trainee.student.forward(ids, mask, grad=grad)
    assert capture.logits is not None
    last = mask.long().sum(1) - 1
    return capture.logits[torch.arange(ids.shape[0], device=ids.device), last]  # (B, V)


@torch.no_grad()
def accuracy(trainee: Trainee, examples: Sequence[Example]) -> float:
    """Held-out accuracy of the student with what it was given (injection and adapters active)."""
    if not examples:
        return float("nan")
    vocab = Vocabulary(trainee.student.core.config.vocab)
    trainee.inject()
    ids, mask, answers = encode_examples(vocab, list(examples), trainee.device)
    pred = _logits(trainee, ids, mask, grad=False).argmax(-1)
    return float((pred == answers).float().mean())


def train_outputs(
    trainee: Trainee,
    examples: Sequence[Example],
    *,
    teacher: TinyTransformer | None,
    steps: int,
    lr: float,
) -> dict[str, float]:
    """KD (``teacher`` given: KL to its output distribution on ``examples``) or labelled cross-entropy."""
    if not examples or steps == 0:
        return {"steps": 0, "seconds": 0.0}
    vocab = Vocabulary(trainee.student.core.config.vocab)
    ids, mask, answers = encode_examples(vocab, list(examples), trainee.device)
    soft = None
    if teacher is not None:
        with torch.no_grad():
            t_ids, t_mask = encode_batch(Vocabulary(teacher.config.vocab), [e.tokens for e in examples], trainee.device)
            rows = torch.arange(len(examples), device=t_ids.device)
            out = teacher(t_ids, t_mask)[rows, t_mask.long().sum(1) - 1]
            soft = torch.log_softmax(out.float(), -1)  # (N, V): the teacher's answers, one query each
    optimizer = torch.optim.Adam(trainee.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        trainee.inject()
        logp = torch.log_softmax(_logits(trainee, ids, mask, grad=True).float(), -1)
        if soft is not None:
            loss = F.kl_div(logp, soft, log_target=True, reduction="batchmean")
        else:
            loss = F.nll_loss(logp, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": float(loss.detach())}


def _student_traces(trainee: Trainee, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, n_layers + 2, d_S) last-token states along the student's layers and final norm; (N, T, T) attention."""
    student = trainee.student
    capture = student.reader.forward(ids, mask, attention=True, grad=True)
    names = student.reader.layer_names
    last = mask.long().sum(1) - 1
    rows = torch.arange(ids.shape[0], device=ids.device)
    states = [capture.hidden[n][rows, last] for n in names]
    states.append(student.core.ln_f(states[-1]))
    assert capture.attentions is not None
    attn = torch.stack(capture.attentions, dim=1)  # (N, layers, H, T, T)
    return torch.stack(states, dim=1).float(), pool_attention_to(attn.float())


def train_m2kt(
    trainee: Trainee,
    contents: PacketContents,
    mix: LossMix,
    *,
    steps: int,
    lr: float,
    log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """The composite loss on the packet alone: L_geo on anchors, L_struct and L_reason on its probes,
    trained through the library's step (:class:`m2kt.student.training.CALTrainer`)."""
    if steps == 0 or (mix.geo == 0 and not contents.texts):
        return {"steps": 0, "seconds": 0.0}
    device = trainee.device
    vocab = Vocabulary(trainee.student.core.config.vocab)
    probes = None
    if contents.texts and (mix.struct > 0 or mix.reason > 0):
        ids, mask = encode_batch(vocab, [t.split() for t in contents.texts], device)
        assert contents.traces is not None and contents.attention is not None
        t_traces = contents.traces.to(device)  # (N, m_T, d_T)
        t_attn = pool_attention_to(contents.attention.to(device))  # (N, L_T, L_T)
        t_out = contents.extra["output_concepts"].to(device)  # (p, d_T)
        core = trainee.student.core
        s_out = core.head.weight.detach()[[vocab.id(str(n)) for n in range(t_out.shape[0])]].to(device)  # (p, d_S)
        probes = (ids, mask, t_traces, t_attn, t_out, s_out)
    weights = LossWeights(
        geo=mix.geo, struct=mix.struct, reason=mix.reason, safety=0.0, reason_temperature=mix.reason_temperature
    )
    trainer = CALTrainer(
        trainee.cal,
        trainee.parameters(),
        weights,
        lr=lr,
        teacher_concepts=trainee.teacher_concepts,
        trust_region=mix.trust_region,
        trust_rows=trainee.target_rows,
    )
    anchors = trainee.anchor_rows

    def inputs(mapped: torch.Tensor) -> dict[str, torch.Tensor]:
        trainee.inject_mapped(mapped)
        args = {"mapped": mapped[anchors], "target": trainee.student_concepts[anchors]}
        if probes is not None:
            ids, mask, t_traces, t_attn, t_out, s_out = probes
            s_traces, s_attn = _student_traces(trainee, ids, mask)
            width = s_attn.shape[-1]
            args.update(
                teacher_attention=t_attn[:, :width, :width],
                student_attention=s_attn,
                attention_mask=mask,
                teacher_traces=t_traces,
                teacher_concepts=t_out,
                student_traces=s_traces,
                student_concepts=s_out,
            )
        return args

    start = time.perf_counter()
    terms: dict[str, float] = {}
    verifier = _ProbeVerifier.split(trainee, contents, mix.holdout, probes) if probes is not None else None
    if verifier is not None:
        probes = verifier.training
    for step_no in range(steps):
        step = trainer.step(inputs).as_dict()
        terms = {k: step[k] for k in ("geo", "struct", "reason") if getattr(mix, k) > 0 and (k == "geo" or probes)}
        if log is not None:
            log(terms)
        if verifier is not None and ((step_no + 1) % mix.check_every == 0 or step_no + 1 == steps):
            verifier.check(step_no)
    kept = verifier.keep_best() if verifier is not None else {}
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        **{f"final_{k}": v for k, v in terms.items()},
        **kept,
    }


class _ProbeVerifier:
    """Early stopping on held-out probes: the teacher's own answers to them (``probe_answer``, no labels)
    against the student's, checked on the zero-shot map and every few steps; the best state is kept, the
    earliest on a tie, so training that does not beat the zero-shot map leaves it in place."""

    def __init__(self, trainee: Trainee, held: tuple[torch.Tensor, torch.Tensor, torch.Tensor], training: Any):
        self.trainee, self.held, self.training = trainee, held, training
        self.best = (self.agreement(), -1, self.state())

    @classmethod
    def split(cls, trainee: Trainee, contents: PacketContents, share: float, probes: Any) -> _ProbeVerifier | None:
        n = len(contents.texts)
        k = int(n * share)
        if contents.answers is None or k == 0 or k == n:
            return None
        held_rows = list(range(0, n, max(1, n // k)))[:k]  # spread over the packet's probe order
        train_rows = [i for i in range(n) if i not in set(held_rows)]
        vocab = Vocabulary(trainee.student.core.config.vocab)
        ids, mask, t_traces, t_attn, t_out, s_out = probes
        answers = torch.tensor([vocab.id(contents.answers[i]) for i in held_rows], device=ids.device)
        rows = torch.tensor(train_rows, device=ids.device)
        training = (ids[rows], mask[rows], t_traces[rows], t_attn[rows], t_out, s_out)
        return cls(trainee, (ids[held_rows], mask[held_rows], answers), training)

    @torch.no_grad()
    def agreement(self) -> int:
        ids, mask, answers = self.held
        self.trainee.inject()
        return int((_logits(self.trainee, ids, mask, grad=False).argmax(-1) == answers).sum())

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        parts = {"cal": self.trainee.cal, "adapters": self.trainee.student.adapters}
        return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in parts.items()}

    def check(self, step: int) -> None:
        agree = self.agreement()
        if agree > self.best[0]:
            self.best = (agree, step, self.state())

    def keep_best(self) -> dict[str, Any]:
        agree, step, state = self.best
        self.trainee.cal.load_state_dict(state["cal"])
        self.trainee.student.adapters.load_state_dict(state["adapters"])
        with torch.no_grad():
            self.trainee.inject()
        return {"kept_step": step, "held_out_probes": int(self.held[2].numel()), "held_out_agreement": agree}
