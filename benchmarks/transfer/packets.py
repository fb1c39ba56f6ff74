"""The teacher side of the benchmark: a signed packet per budget, with honest query counts.

A packet here carries

* ``concepts`` [K, d_T] — one concept per token the student shares or should receive, labelled
  ``token:<t>``: the teacher's token-embedding rows, read from its weights. Reading a weight row
  runs no input through the teacher, so these cost **0 teacher queries**;
* ``output_concepts`` [p, d_T] — the teacher's output (unembedding) rows for the answer tokens,
  also read from the weights (0 queries): the concept set its reasoning traces are read against;
* for a budget of N > 0 queries, N probe inputs (``probe_text``) run through the teacher once:
  ``traces`` [N, m, d_T] (the state at the last token after the embedding, each block and the
  final norm — the reasoning path to the answer), ``attention`` [N, layers, 1, L, L] (head-mean) and
  the teacher's own answer to each (``probe_answer``: the argmax of that same pass);
* optionally a decomposition the teacher declares for a new operation (its own search, whose teacher
  forward passes are counted too).

The manifest's ``data_usage.probe_count`` is every teacher query the packet needed. No labels anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2kt.format import write_packet
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import (
    ConceptEntry,
    DataUsage,
    ExtractionInfo,
    ExtractionStep,
    ManifestBody,
    SafetyInfo,
    TeacherInfo,
)
from m2kt.format.probe_text import PROBE_ANSWER, encode_probe_texts, encode_texts
from m2kt.nn.digest import state_dict_sha256
from m2kt.toy.model import TinyTransformer
from m2kt.toy.symbolic import Example, Vocabulary
from m2kt.toy.train import encode_batch

__all__ = ["CREATED_AT", "anchor_tokens", "write_transfer_packet"]

CREATED_AT = datetime(2026, 1, 1, tzinfo=UTC)  # fixed, so the same run gives the same packet bytes


def anchor_tokens(vocab: Vocabulary, known_operators: Sequence[str], p: int) -> list[str]:
    """Tokens both models know: every plain number and the student's own operators."""
    return [str(n) for n in range(p)] + [t for t in known_operators if t in vocab]


@torch.no_grad()
def _traces_and_attention(
    teacher: TinyTransformer, vocab: Vocabulary, probes: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, n_layers + 2, d_T) states at the last token, (N, n_layers, 1, L, L) head-mean attention, and the
    teacher's own answer to each probe (its argmax output token) — all from one forward pass."""
    device = next(teacher.parameters()).device
    ids, mask = encode_batch(vocab, [e.tokens for e in probes], device)  # (N, L)
    states: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    hooks = [teacher.embed.register_forward_hook(lambda _m, _i, out: states.append(out))]
    for block in teacher.blocks:
        hooks.append(block.register_forward_hook(lambda _m, _i, out: states.append(out)))
        hooks.append(block.attn.probs.register_forward_hook(lambda _m, _i, out: attention.append(out)))
    try:
        logits = teacher(ids, mask)  # (N, L, V)
    finally:
        for h in hooks:
            h.remove()
    states.append(teacher.ln_f(states[-1]))
    last = mask.long().sum(1) - 1  # (N,)
    rows = torch.arange(len(probes), device=device)
    traces = torch.stack([s[rows, last] for s in states], dim=1)  # (N, m, d_T)
    attn = torch.stack([a.mean(dim=1, keepdim=True) for a in attention], dim=1)  # (N, layers, 1, L, L)
    answers = vocab.decode(logits[rows, last].argmax(-1).cpu())
    return traces.cpu(), attn.cpu(), answers


def write_transfer_packet(
    teacher: TinyTransformer,
    tokens: Sequence[str],
    probes: Sequence[Example],
    key: SigningKey,
    out: Path,
    *,
    topic: str,
    p: int,
    decomposition: dict[str, Any] | None = None,
) -> Path:
    """Sign and write the packet for ``tokens`` (concepts) and ``probes`` (N teacher queries; may be empty).

    ``decomposition``: what :func:`m2kt.teacher.decompose.declare_decomposition` found, declared in the
    manifest; its ``forward_passes`` are added to the packet's teacher queries."""
    vocab = Vocabulary(teacher.config.vocab)
    table = teacher.embed.tok.weight.detach().cpu()  # (V, d_T)
    concepts = table[[vocab.id(t) for t in tokens]]  # (K, d_T)
    outputs = teacher.head.weight.detach().cpu()[[vocab.id(str(n)) for n in range(p)]]  # (p, d_T)
    tensors: dict[str, np.ndarray] = {
        "concepts": concepts.float().numpy(),
        "output_concepts": outputs.float().numpy(),
    }
    steps: dict[str, ExtractionStep | None] = {"attention": None, "traces": None}
    extra_passes = int(decomposition["forward_passes"]) if decomposition else 0
    if probes:
        traces, attention, answers = _traces_and_attention(teacher, vocab, probes)
        texts = [" ".join(e.tokens) for e in probes]
        tensors.update(encode_probe_texts(texts))
        tensors.update(encode_texts(answers, PROBE_ANSWER))  # the teacher's outputs of these queries, no labels
        tensors["traces"] = traces.float().numpy()
        tensors["attention"] = attention.float().numpy()
        n_layers = teacher.config.n_layers
        params: dict[str, Any] = {
            "position": "last",
            "layers": ["embed", *(f"blocks.{i}" for i in range(n_layers)), "ln_f"],
            "answers": PROBE_ANSWER,
            "decode": "argmax",
        }
        if decomposition:
            params["decomposition"] = decomposition
        steps["traces"] = ExtractionStep(method="hidden-states-layers", params=params)
        steps["attention"] = ExtractionStep(method="attention-probabilities", params={"per": "probe", "pool": "heads"})
    cfg = teacher.config
    body = ManifestBody(
        topic=topic,
        teacher=TeacherInfo(
            model_name="tiny-transformer",
            architecture=f"TinyTransformer(d={cfg.d_model},L={cfg.n_layers},H={cfg.n_heads},ff={cfg.d_ff})",
            weights_sha256=state_dict_sha256(teacher),
            d_model=cfg.d_model,
            layers=["embed.tok", "head"] + (["embed", "blocks", "ln_f"] if probes else []),
        ),
        concepts=[
            ConceptEntry(id=f"c{i}", label=f"token:{t}", kind="embedding-row", safety_score=0.0)
            for i, t in enumerate(tokens)
        ],
        extraction=ExtractionInfo(
            concepts=ExtractionStep(
                method="token-embedding-rows",
                params={"layer": "embed.tok", "source": "weights", "output_concepts": "head rows of the answers"},
            ),
            **steps,
        ),
        data_usage=DataUsage(
            probe_count=len(probes) + extra_passes,
            teacher_forward_passes=(1 if probes else 0) + extra_passes,
            labelled_examples=0,
        ),
        safety=SafetyInfo(scorer="none", version="0"),
        created_at=CREATED_AT,
    )
    return write_packet(out, body, tensors, key).path
