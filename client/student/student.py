"""The student: a frozen core model plus the small parts an ingestion trains.

    student = Student(model)                      # core parameters frozen from here on
    report = ingest(student, "arith.m2kt", config, keys=teacher_key, suite=suite)
    student.predict(["3 plus 5 ="])               # uses what the packet taught it
    student.save_trainable("student.safetensors") # only CAL, injected concepts, adapters

Trainable parts, each a no-op when fresh: the Concept Alignment Layer (which produces the
injected vectors), a :class:`TokenInjector` (a concept labelled ``token:<t>`` replaces a
layer's output wherever the input is ``<t>``), and :class:`ResidualAdapter` s after chosen
layers (zero-initialised output projection). The core is never written to; a test proves
its parameters bit-identical after ingestion.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2kt.nn.adapters import adapter_for
from m2kt.nn.base import ModelAdapter
from m2kt.nn.batch import Capture
from m2kt.nn.digest import state_dict_sha256
from m2kt.nn.embed import Pooling, embed_texts
from m2kt.nn.programs import Expr, Template
from m2kt.student.binding import ProgramBinding, SlotInjector
from m2kt.student.concepts import ConceptMap

__all__ = ["ResidualAdapter", "Student", "TokenInjector"]


class ResidualAdapter(nn.Module):
    """h + up(gelu(down(h))) with ``up`` zero-initialised: a fresh adapter changes nothing."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank)
        self.up = nn.Linear(rank, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return h + self.up(torch.nn.functional.gelu(self.down(h)))


class TokenInjector(nn.Module):
    """Replaces a layer's output at the positions of given tokens with given vectors.

    ``vectors`` is set by the ingestion (the CAL's output for the target concepts); it is a
    buffer when frozen and a live tensor with gradient while training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.token_ids: list[int] = []
        self.labels: list[str] = []
        self.register_buffer("vectors", torch.zeros(0, 0))

    def set(self, token_ids: Sequence[int], labels: Sequence[str], vectors: torch.Tensor) -> None:
        self.token_ids, self.labels = list(token_ids), list(labels)
        self.vectors = vectors  # (n, d_S); may carry grad during training

    def clear(self) -> None:
        self.set([], [], torch.zeros(0, 0))

    def apply(self, h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d) → (B, T, d) with injected rows."""
        if not self.token_ids:
            return h
        out = h
        for i, token in enumerate(self.token_ids):
            where = (input_ids == token).unsqueeze(-1)  # (B, T, 1)
            out = torch.where(where, self.vectors[i].to(out.dtype), out)
        return out


class Student:
    """A frozen core model with an injector and adapters hooked into it."""

    def __init__(self, model: Any, tokenizer: Any = None, *, inject_layer: str | None = None) -> None:
        self.reader: ModelAdapter = adapter_for(model, tokenizer)
        self.core: nn.Module = self.reader.model
        for p in self.core.parameters():
            p.requires_grad_(False)
        self.core.eval()
        self.core_sha256 = state_dict_sha256(self.core)
        self.injector = TokenInjector()
        self.slots = SlotInjector()  # concepts bound to slots of an input (re-bound operations, one pass)
        self.programs: dict[str, ProgramBinding] = {}  # operator token -> a program of the core's own passes
        self.adapters = nn.ModuleDict()
        self.cal: nn.Module | None = None
        self.meta: dict[str, Any] = {}
        self.concepts: ConceptMap | None = None  # labelled concept vectors in this student's space (encoders)
        self._embeddings: dict[tuple[str, str, str], torch.Tensor] = {}  # (layer, pooling, text) -> vector
        self._input_ids: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self.inject_layer = inject_layer or self.reader.layer_names[0]
        self.install_hooks()

    # ------------------------------------------------------------------ wiring

    @property
    def device(self) -> torch.device:
        return self.reader.device

    def to(self, device: torch.device) -> Student:
        self.core.to(device)
        self.adapters.to(device)
        self.injector.to(device)
        if self.cal is not None:
            self.cal.to(device)
        self.reader.device = device
        return self

    def install_hooks(self) -> None:
        """(Re)attach the injector and adapter hooks to the core (after a change of layer or adapters)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

        def capture_ids(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._input_ids = ids

        self._hooks.append(self.core.register_forward_pre_hook(capture_ids, with_kwargs=True))

        def inject(_m: nn.Module, _i: Any, output: Any) -> Any:
            if self._input_ids is None or not (self.injector.token_ids or self.slots.bindings):
                return output
            ids = self._input_ids
            if isinstance(output, tuple):
                return (self.slots.apply(self.injector.apply(output[0], ids), ids), *output[1:])
            return self.slots.apply(self.injector.apply(output, ids), ids)

        self._hooks.append(self.reader.layer_module(self.inject_layer).register_forward_hook(inject))
        for name, adapter in self.adapters.items():
            self._hooks.append(self.reader.layer_module(_unkey(name)).register_forward_hook(_adapter_hook(adapter)))

    def detach(self) -> None:
        """Remove this student's hooks from the core model (the core is then as it was)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def set_inject_layer(self, layer: str) -> None:
        self.reader.layer_module(layer)  # raises if unknown
        self.inject_layer = layer
        self.install_hooks()

    def add_adapters(self, layers: Sequence[str], rank: int) -> None:
        for layer in layers:
            key = _key(layer)
            if key not in self.adapters:
                self.adapters[key] = ResidualAdapter(self.reader.d_model, rank).to(self.device)
        self.install_hooks()

    # ------------------------------------------------------------------ running

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, *, attention: bool = False, grad: bool = False
    ) -> Capture:
        return self.reader.forward(input_ids, mask, attention=attention, grad=grad)

    def answer_distribution(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """(N, V) output probabilities at each input's last token (a program-bound input: at its last pass;
        one whose binding has voters: the share of its programs giving each answer)."""
        finals, owner = self._run_programs(texts)
        distribution = self._distribution(finals, batch_size)
        if len(finals) == len(texts):
            return distribution
        return _vote(distribution, torch.tensor(owner), len(texts))

    def _distribution(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        batch = self.reader.tokenize(texts)
        rows = []
        for start in range(0, len(texts), batch_size):
            stop = min(start + batch_size, len(texts))
            ids, mask = batch.slice(start, stop, self.device)
            capture = self.forward(ids, mask)
            assert capture.logits is not None, "the student has no output head"
            last = torch.tensor(batch.lengths[start:stop], device=self.device) - 1
            rows.append(torch.softmax(capture.logits[torch.arange(stop - start), last].float(), -1).cpu())
        return torch.cat(rows)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The argmax output token for each input."""
        return [self.reader.output_token(int(i)) for i in self.answer_distribution(texts).argmax(-1)]

    def _run_programs(self, texts: Sequence[str]) -> tuple[list[str], list[int]]:
        """(the last pass of each input, the input each belongs to): an input whose operator is bound to a
        program becomes its last pass (one per program when the binding has voters); the inner passes run
        here, batched level by level on the core (with whatever else is injected)."""
        if not self.programs:
            return list(texts), list(range(len(texts)))
        finals: list[str] = []
        owner: list[int] = []
        todo: dict[int, tuple[ProgramBinding, Expr]] = {}
        for i, text in enumerate(texts):
            found = self._bound(text)
            if found is None:
                finals.append(text)
                owner.append(i)
                continue
            binding, slots = found
            for program in binding.programs:
                todo[len(finals)] = (
                    binding,
                    program.substitute("a", Expr.const(slots[0])).substitute("b", Expr.const(slots[2])),
                )
                finals.append(text)
                owner.append(i)
        while True:
            inner = {(b.template, *leaves) for b, e in todo.values() for leaves in _inner_applies(e)}
            if not inner:
                break
            order = sorted(inner, key=lambda k: (k[0].text, k[1], k[2], k[3]))
            answers = self.predict_raw([t.format(x, op, y) for t, op, x, y in order])
            value = dict(zip(order, answers, strict=True))
            todo = {i: (b, _reduce(e, b.template, value)) for i, (b, e) in todo.items()}
        for i, (binding, expr) in todo.items():
            x, y = (str(a.leaf) for a in expr.args)
            finals[i] = binding.template.format(x, str(expr.op), y)
        return finals, owner

    def _bound(self, text: str) -> tuple[ProgramBinding, tuple[str, str, str]] | None:
        """The program binding whose operator ``text`` uses, with the text's slots; None if there is none."""
        for binding in self.programs.values():
            slots = binding.template.parse(text)
            if slots is not None and slots[1] == binding.operator and binding.program.op is not None:
                return binding, slots
        return None

    def predict_raw(self, texts: Sequence[str]) -> list[str]:
        """The argmax output of one pass per input, programs not applied."""
        return [self.reader.output_token(int(i)) for i in self._distribution(texts).argmax(-1)]

    def accuracy(self, texts: Sequence[str], answers: Sequence[str]) -> float:
        """The share of ``texts`` whose predicted token is the answer."""
        return sum(p == a for p, a in zip(self.predict(texts), answers, strict=True)) / len(texts)

    # ------------------------------------------------------------------ encoders: vectors and concepts

    def embed(self, texts: Sequence[str], *, layer: str | None = None, pooling: Pooling = "mean") -> torch.Tensor:
        """(N, d) float32 on the CPU: each input's state at ``layer`` (default: the last), pooled over its
        tokens (``"mean"``, whatever the token count) or read at a position. Only inputs not seen before
        with the same layer and pooling are run, in length-sorted batches; the rest come from a cache."""
        layer = layer or self.reader.layer_names[-1]
        self.reader.layer_module(layer)  # raises for an unknown layer
        key = (layer, str(pooling))
        todo = list(dict.fromkeys(t for t in texts if (*key, t) not in self._embeddings))
        if todo:
            vectors = embed_texts(self.reader, todo, layer, pooling)
            for text, vector in zip(todo, vectors, strict=True):
                self._embeddings[(*key, text)] = vector
        if not texts:
            return torch.zeros(0, self.reader.d_model)
        return torch.stack([self._embeddings[(*key, t)] for t in texts])

    def classify(self, texts: Sequence[str]) -> list[str]:
        """The nearest of the student's concepts (cosine) for each input — for models without an output head."""
        if self.concepts is None:
            raise ValueError("the student holds no concepts: ingest a packet of concepts first")
        return self.concepts.classify(self.embed(texts, layer=self.concepts.layer, pooling=self.concepts.pooling))

    def refine_concepts(self, texts: Sequence[str]) -> list[int]:
        """Move the held concepts toward this student's own unlabelled ``texts`` of their domain, one step
        (:func:`m2kt.student.concepts.refined`); returns how many texts joined each concept. No labels and no
        teacher queries: the texts are the student's, and their labels are never asked for."""
        if self.concepts is None:
            raise ValueError("the student holds no concepts: ingest a packet of concepts first")
        if not texts:
            raise ValueError("refine_concepts needs at least one unlabelled text")
        own = self.embed(texts, layer=self.concepts.layer, pooling=self.concepts.pooling)
        self.concepts, members = self.concepts.refined(own)
        return members

    # ------------------------------------------------------------------ trainable state

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.adapters.parameters())
        if self.cal is not None:
            params += list(self.cal.parameters())
        return [p for p in params if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything ingestion changed, as contiguous CPU tensors (what is saved and rolled back)."""
        state: dict[str, torch.Tensor] = {}
        if self.cal is not None:
            state.update({f"cal.{k}": v for k, v in self.cal.state_dict().items()})
        state.update({f"adapters.{k}": v for k, v in self.adapters.state_dict().items()})
        state["inject.vectors"] = self.injector.vectors
        state.update(self.slots.state())
        if self.concepts is not None:
            state["concepts.vectors"] = self.concepts.vectors
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    def save_trainable(self, path: str | Path) -> Path:
        """Only what ingestion trained, to safetensors, with the wiring in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "m2kt.student": json.dumps(
                {
                    "inject_layer": self.inject_layer,
                    "inject_tokens": self.injector.token_ids,
                    "inject_labels": self.injector.labels,
                    "adapters": sorted(_unkey(k) for k in self.adapters),
                    "slots": self.slots.meta(),
                    "concepts": self.concepts.meta() if self.concepts is not None else None,
                    "programs": [b.meta() for b in self.programs.values()],
                    "core_sha256": self.core_sha256,
                    **self.meta,
                },
                sort_keys=True,
            )
        }
        save_file(self.trainable_state(), str(path), metadata=meta)
        return path

    def load_trainable(self, path: str | Path) -> None:
        """Restore a saved ingestion (strict; the core must be the one it was trained on)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("m2kt.student", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if meta.get("core_sha256") != self.core_sha256:
            raise ValueError(f"{path} was trained on a different core model (weights digest differs)")
        from m2kt.student.cal import CALConfig, build_cal, load_cal_state

        if any(k.startswith("cal.") for k in tensors):
            if "cal" not in meta:
                raise ValueError(f"{path} holds a CAL but not its config")
            config = CALConfig.from_json({**meta["cal"], "init": "none"})
            n = int(meta.get("n_anchors", 1))
            self.cal = build_cal(
                config,
                int(meta["d_teacher"]),
                int(meta["d_student"]),
                anchors_teacher=torch.ones(n, int(meta["d_teacher"])) if config.kind == "anchor" else None,
                anchors_student=torch.ones(n, int(meta["d_student"])) if config.kind == "anchor" else None,
            ).to(self.device)
            load_cal_state(self.cal, {k[4:]: v for k, v in tensors.items() if k.startswith("cal.")})
        rank = None
        for k, v in tensors.items():
            if k.startswith("adapters.") and k.endswith("down.weight"):
                rank = v.shape[0]
        if meta.get("adapters"):
            assert rank is not None
            self.add_adapters(meta["adapters"], rank)
            self.adapters.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("adapters.")})
        self.slots.load(meta.get("slots", []), tensors, self.device)
        self.concepts = (
            ConceptMap.from_meta(meta["concepts"], tensors["concepts.vectors"]) if meta.get("concepts") else None
        )
        self.programs = {b.operator: b for b in (ProgramBinding.from_meta(m) for m in meta.get("programs", []))}
        self.meta = {
            k: v
            for k, v in meta.items()
            if k
            not in ("inject_layer", "inject_tokens", "inject_labels", "adapters", "slots", "programs", "core_sha256")
        }
        if meta.get("inject_layer") and meta["inject_layer"] != self.inject_layer:
            self.set_inject_layer(meta["inject_layer"])
        self.injector.set(
            meta.get("inject_tokens", []), meta.get("inject_labels", []), tensors["inject.vectors"].to(self.device)
        )

    def restore(self, state: dict[str, torch.Tensor], injected: tuple[list[int], list[str]]) -> None:
        """Put back a :meth:`trainable_state` taken earlier (the rollback)."""
        if self.cal is not None:
            self.cal.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("cal.")})
        self.adapters.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("adapters.")})
        self.injector.set(injected[0], injected[1], state["inject.vectors"].to(self.device))


def _vote(distribution: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n, V): for each input, the share of its rows of ``distribution`` (M, V) whose argmax is each answer;
    a tie goes to the answer with the higher mean probability (a small term that never outweighs a vote)."""
    votes = torch.zeros(n, distribution.shape[1])
    votes.index_add_(0, owner, torch.nn.functional.one_hot(distribution.argmax(-1), distribution.shape[1]).float())
    mean = torch.zeros_like(votes).index_add_(0, owner, distribution)
    scores = votes + 1e-3 * mean
    return scores / scores.sum(1, keepdim=True).clamp(min=1e-12)


def _inner_applies(expr: Expr) -> list[tuple[str, str, str]]:
    """(op, x, y) of every operation below the root whose operands are known values."""
    found: list[tuple[str, str, str]] = []

    def walk(e: Expr, root: bool) -> None:
        if e.op is None:
            return
        if not root and all(a.op is None for a in e.args):
            found.append((e.op, str(e.args[0].leaf), str(e.args[1].leaf)))
            return
        for a in e.args:
            walk(a, False)

    walk(expr, True)
    return found


def _reduce(
    expr: Expr, template: Template, value: dict[tuple[Template, str, str, str], str], *, root: bool = True
) -> Expr:
    """``expr`` with every computed inner operation (never the root: that is the last pass) replaced by its answer."""
    if expr.op is None:
        return expr
    args = tuple(_reduce(a, template, value, root=False) for a in expr.args)
    if not root and all(a.op is None for a in args):
        key = (template, expr.op, str(args[0].leaf), str(args[1].leaf))
        if key in value:
            return Expr.const(value[key])
    return Expr(op=expr.op, args=args)


def _key(layer: str) -> str:
    return layer.replace(".", "__")


def _unkey(key: str) -> str:
    return key.replace("__", ".")


def _adapter_hook(adapter: ResidualAdapter) -> Any:
    def hook(_m: nn.Module, _i: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook
