"""``m2kt`` commands that run models on this node: ``pack`` (teacher side).

torch and the model code are imported inside the commands, so ``m2kt --help`` and the
packet/broker commands work on an install without the ``node`` extra.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from m2kt.cli.app import EXIT_FILE, EXIT_REFUSED, EXIT_USAGE, app, fail, out
from m2kt.errors import KeyFileError


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        fail(EXIT_USAGE, "this command runs models: install the node extra (pip install 'm2kt[node]')")


class _Bar:
    """What a command sees of its progress bar: set the total once known, then advance."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def set_total(self, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextmanager
def progress_bar(description: str, *, quiet: bool, total: int | None = None) -> Iterator[_Bar]:
    """A rich bar (count, elapsed time) on a terminal; a bar that draws nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))


@app.command()
def pack(
    model: Annotated[
        str, typer.Option("--model", help="Saved model directory (TinyTransformer or transformers), or 'minilm'.")
    ],
    spec_file: Annotated[Path, typer.Option("--spec", help="Packet spec (YAML or JSON).")],
    key: Annotated[Path, typer.Option("--key", help="Private signing key file.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Packet file to write (default <topic>.m2kt).")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (overrides the spec).")
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="The teacher's broker node id, for the manifest.")] = None,
    created_at: Annotated[
        datetime | None, typer.Option("--created-at", help="Timestamp for the manifest (reproducible packets).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Extract concepts, attention and traces from a model into a signed packet (Algorithm 1)."""
    _require_torch()
    from dataclasses import replace

    from m2kt.cli.local import safety_summary
    from m2kt.cli.models import load_model
    from m2kt.errors import SpecError
    from m2kt.format import PacketError, packet_id, read_header
    from m2kt.format.keys import load_signing_key
    from m2kt.nn.device import pick_device
    from m2kt.teacher import build_packet, load_spec

    try:
        signing_key = load_signing_key(key)
    except KeyFileError as exc:
        fail(EXIT_FILE, f"key: {exc}")
    if not spec_file.is_file():
        fail(EXIT_FILE, f"spec: {spec_file}: no such file")
    try:
        spec = load_spec(spec_file)
        if device is not None:
            spec = replace(spec, device=device)
        needs_logits = (
            spec.concepts.method == "attribution"
            or (spec.traces.enabled and spec.traces.source == "decode")
            or spec.answers
        )
        loaded = load_model(model, device=pick_device(spec.device), logits=needs_logits)
        if spec.model_name is None:
            spec = replace(spec, model_name=loaded.name)
        if created_at is not None and created_at.tzinfo is None:
            fail(EXIT_USAGE, "--created-at needs a timezone, e.g. 2026-01-01T00:00:00+00:00")
        with progress_bar("probing the teacher", quiet=quiet) as bar:
            path = build_packet(
                loaded.model,
                spec,
                signing_key,
                out_file,
                tokenizer=loaded.tokenizer,
                teacher_node=node,
                created_at=created_at,
                progress=bar.advance,
                on_plan=lambda plan: bar.set_total(len(plan.texts)),
            )
    except SpecError as exc:
        fail(EXIT_USAGE, f"spec: {exc}")
    except PacketError as exc:  # pragma: no cover - the builder writes valid packets
        fail(EXIT_USAGE, f"packet: {exc.code}: {exc.message}")
    except OSError as exc:
        fail(EXIT_FILE, f"{exc.filename or out_file}: {exc.strerror or exc}")
    header = read_header(path)
    m = header.manifest
    out.print(f"packet   {path}  ({header.file_size:,} bytes)", markup=False)
    out.print(f"id       {packet_id(path)}", markup=False)
    out.print(
        f"topic    {m.topic} · {len(m.concepts)} {m.extraction.concepts.method} concepts · d_T={m.teacher.d_model}",
        markup=False,
    )
    out.print(
        f"data     {m.data_usage.probe_count} probes · {m.data_usage.teacher_forward_passes} teacher forward passes · "
        f"{m.data_usage.labelled_examples} labelled examples",
        markup=False,
    )
    out.print(f"safety   {safety_summary(m)}", markup=False)


@app.command("train-tiny")
def train_tiny_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to save the model into (safetensors + JSON).")],
    p: Annotated[int, typer.Option("--p", help="Modulus of the task a OP b = over Z_p.")] = 23,
    operators: Annotated[
        str,
        typer.Option(
            "--operators",
            help="Comma-separated operator tokens: an operation (add, sub, mul, ...) or a synonym NAME=OPERATION "
            "(plus=add) the model learns as that operation.",
        ),
    ] = "add,sub",
    vocab: Annotated[
        str,
        typer.Option(
            "--vocab", help="Comma-separated operator tokens to put in the vocabulary untrained (e.g. plus,minus)."
        ),
    ] = "",
    d_model: Annotated[int, typer.Option("--d-model")] = 64,
    layers: Annotated[int, typer.Option("--layers")] = 2,
    heads: Annotated[int, typer.Option("--heads")] = 4,
    steps: Annotated[int, typer.Option("--steps")] = 600,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Train a TinyTransformer on a built-in task ``a OP b =`` over Z_p (a teacher, or a student to ingest into)."""
    _require_torch()
    from m2kt.nn.device import pick_device
    from m2kt.toy.checkpoint import save_tiny
    from m2kt.toy.model import TinyConfig
    from m2kt.toy.symbolic import OPERATIONS, ModularTask
    from m2kt.toy.train import TrainConfig, train_tiny

    tokens = {name.strip(): (op or name).strip() for name, _, op in (o.partition("=") for o in operators.split(","))}
    tokens.pop("", None)
    unknown = [f"{t}={o}" if t != o else t for t, o in tokens.items() if o not in OPERATIONS]
    if not tokens or unknown:
        fail(EXIT_USAGE, f"--operators: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(OPERATIONS)}")
    extra = tuple(v.strip() for v in vocab.split(",") if v.strip())
    names = list(tokens)
    try:
        task = ModularTask(p=p, operators=tokens, vocab_operators=extra)
        config = TinyConfig.for_task(task, d_model=d_model, n_layers=layers, n_heads=heads)
        train = TrainConfig(steps=steps, seed=seed, device=str(pick_device(device)))
    except ValueError as exc:
        fail(EXIT_USAGE, str(exc))
    model, metrics = train_tiny(task, config, train)
    path = save_tiny(model, out_dir)
    out.print(
        f"trained  {config.d_model}-wide, {config.n_layers} layers on a OP b = over Z_{p} ({', '.join(names)}) "
        f"in {metrics['seconds']:.1f} s on {metrics['device']}",
        markup=False,
    )
    out.print(f"accuracy train {metrics['train_accuracy']:.3f} · held-out {metrics['test_accuracy']:.3f}", markup=False)
    out.print(f"saved    {path}", markup=False)


@app.command("ingest-template")
def ingest_template() -> None:
    """Print an ingest config with every field at its default, and an empty verifier suite, as JSON to edit."""
    _require_torch()
    import json
    from dataclasses import asdict

    from m2kt.student import IngestConfig, ProbeSuite

    template = {"config": IngestConfig().to_json(), "suite": asdict(ProbeSuite())}
    sys.stdout.write(json.dumps(template, indent=2) + "\n")


@app.command()
def ingest(
    ctx: typer.Context,
    packet: Annotated[Path, typer.Argument(help="Packet file (.m2kt); verified before anything is read from it.")],
    student_dir: Annotated[
        str,
        typer.Option("--student", help="Saved student model directory (TinyTransformer or transformers), or 'minilm'."),
    ],
    key: Annotated[list[Path], typer.Option("--key", help="Trusted teacher public key file; repeat to trust several.")],
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Ingest config (JSON; every field with its default: m2kt ingest-template; an example: "
            "examples/synonyms/ingest.json). Defaults if absent.",
        ),
    ] = None,
    suite_file: Annotated[
        Path | None,
        typer.Option(
            "--suite",
            help="Verifier probe suite (JSON: task, answers, safety, flagged, flagged_position; an example: "
            "examples/synonyms/suite.json). Without one only what the packet lets the student check itself (anchors, "
            "shared texts, re-binding probes) is verified; with nothing checked the ingestion is rolled back.",
        ),
    ] = None,
    load: Annotated[Path | None, typer.Option("--load", help="A previous ingestion's weights to start from.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for ingested.safetensors and report.json.")] = Path(
        "ingested"
    ),
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (overrides the config).")
    ] = None,
    receipt: Annotated[
        bool, typer.Option("--receipt", help="Post the report to the broker as an ingestion receipt.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Ingest a packet into a student (Algorithm 2): CAL, composite loss, verifier, safety auditor, rollback."""
    _require_torch()
    from dataclasses import replace

    from m2kt.cli.models import load_model
    from m2kt.errors import IngestError, SpecError
    from m2kt.format import PacketError
    from m2kt.format.keys import load_verify_key
    from m2kt.student import IngestConfig, ProbeSuite, Student
    from m2kt.student import ingest as run_ingest

    try:
        keys = [load_verify_key(k) for k in key]
    except KeyFileError as exc:
        fail(EXIT_FILE, f"key: {exc}")
    for path in (packet, config_file, suite_file, load):
        if path is not None and not path.is_file():
            fail(EXIT_FILE, f"{path}: no such file")
    try:
        config = IngestConfig.load(config_file) if config_file else IngestConfig()
        if device is not None:
            config = replace(config, device=device)
        suite = ProbeSuite.load(suite_file) if suite_file else ProbeSuite()
        loaded = load_model(student_dir)
        student = Student(loaded.model, loaded.tokenizer)
        if load is not None:
            student.load_trainable(load)
    except (ValueError, TypeError, SpecError) as exc:
        fail(EXIT_USAGE, f"{exc}")
    with progress_bar("ingesting", quiet=quiet, total=config.steps) as bar:
        try:
            report = run_ingest(
                student, packet, config, keys=keys, suite=suite, progress=lambda step, total, terms: bar.advance()
            )
        except PacketError as exc:
            fail(EXIT_REFUSED, f"refused: {exc.code}: {exc.message}")
        except (IngestError, SpecError) as exc:
            fail(EXIT_USAGE, str(exc))
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = student.save_trainable(out_dir / "ingested.safetensors")
    report.save(out_dir / "report.json")
    out.print(
        f"decision {report.decision}" + (f" — {'; '.join(report.reasons)}" if report.reasons else ""),
        markup=False,
    )
    scores = report.probe_scores

    def score(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    out.print(
        f"probes   {scores['measure']}: before {score(scores['before'])} · after {score(scores['after'])}", markup=False
    )
    if report.alignment is not None:
        a = report.alignment
        how = (
            f"{a['method']} on {report.data_usage['anchors']} anchors"
            + (" (stored from an earlier packet)" if a["reused"] else "")
            if a["method"]
            else "none needed (the packet shares its concepts' texts)"
        )
        out.print(
            f"aligned  {how}; {len(report.injected)} concepts held for `m2kt classify`, "
            f"{report.timings['total']:.2f} s on {report.device}",
            markup=False,
        )
    else:
        out.print(
            f"trained  {report.steps_run} steps, {report.trainable_parameters:,} parameters, "
            f"{report.timings['train']:.2f} s on {report.device}",
            markup=False,
        )
    out.print(f"wrote    {weights} and {out_dir / 'report.json'}", markup=False)
    if receipt:
        from m2kt.cli.remote import broker_client

        with broker_client(ctx) as broker:
            broker.post_receipt(report.packet["id"], report.decision, report.scores(), report.to_json())
        out.print(f"receipt  posted for {report.packet['id']}", markup=False)
    if not report.accepted:
        raise typer.Exit(EXIT_REFUSED)


def _read_texts(path: Path) -> tuple[list[str], list[str] | None]:
    """Texts (and labels, when every line has one) from a .jsonl file ({"text", "label"}) or plain lines."""
    import json

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines, None
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
        except (ValueError, KeyError, TypeError):
            fail(EXIT_USAGE, f"{path}:{number}: each line must be a JSON object with a 'text' (and a 'label')")
        labels.append(row.get("label"))
    return texts, labels if all(lab is not None for lab in labels) else None


@app.command()
def classify(
    texts_file: Annotated[
        Path, typer.Argument(help='Texts: a .jsonl file ({"text", "label"} per line) or one text per line.')
    ],
    student_dir: Annotated[str, typer.Option("--student", help="The student model directory, or 'minilm'.")],
    load: Annotated[Path, typer.Option("--load", help="The ingestion's weights (ingested.safetensors).")],
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: predictions and accuracy.")] = False,
) -> None:
    """Classify texts with the concepts a student ingested: the nearest concept to each text's vector.

    With labels in the file, prints the accuracy too."""
    _require_torch()
    import json

    from m2kt.cli.models import load_model
    from m2kt.errors import SpecError
    from m2kt.nn.device import pick_device
    from m2kt.student import Student

    for path in (texts_file, load):
        if not path.is_file():
            fail(EXIT_FILE, f"{path}: no such file")
    texts, labels = _read_texts(texts_file)
    try:
        loaded = load_model(student_dir, device=pick_device(device))
        student = Student(loaded.model, loaded.tokenizer)
        student.load_trainable(load)
    except (ValueError, TypeError, SpecError) as exc:
        fail(EXIT_USAGE, f"{exc}")
    if student.concepts is None:
        fail(EXIT_USAGE, f"{load} holds no concepts: ingest a packet of concepts with this student first")
    predicted = student.classify(texts)
    accuracy = sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(texts) if labels and texts else None
    if as_json:
        out.print_json(json.dumps({"count": len(texts), "accuracy": accuracy, "predictions": predicted}))
        return
    for label, text in zip(predicted, texts, strict=True):
        out.print(f"{label}\t{text}", markup=False, highlight=False, soft_wrap=True)
    if accuracy is not None:
        out.print(f"accuracy {accuracy:.4f} on {len(texts)} labelled texts", markup=False)
