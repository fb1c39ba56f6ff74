"""``m2kt demo``: the whole M2KT loop on one machine, in a minute or two, with nothing configured.

1. a broker: the embedded default (SQLite + a blob directory) on a free loopback port, or an
   existing one (``--broker URL`` with an admin token);
2. a teacher node and a student node, registered by the admin, each with its own Ed25519 key;
3. the teacher, a TinyTransformer trained on ``a OP b =`` over Z_11 that also knows the synonyms
   ``plus`` / ``minus``; the student, smaller, deeper, another seed, trained on ``add`` / ``sub``
   only — ``plus`` and ``minus`` are in its vocabulary but never trained;
4. the teacher extracts operator concepts (12 probes per operator, no labels), signs the packet
   with its key and publishes it;
5. the student, subscribed to the topic, fetches the packet, verifies it against the key the
   broker's registry names, ingests it (Algorithm 2: CAL, composite loss, verifier, rollback) and
   posts the ingestion receipt;
6. a report: teacher accuracy, student before / after on the synonyms, % of teacher, data used,
   packet size, lineage and receipts, and where everything was written.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2kt.errors import DemoError
from m2kt.toy.probes import operator_probes
from m2kt.toy.symbolic import ModularTask

if TYPE_CHECKING:
    from m2kt.student.report import IngestReport

P = 11
TOPIC = "demo.arith-synonyms"
SYNONYMS = {"plus": "add", "minus": "sub"}
TEACHER_TASK = ModularTask(p=P, operators={"add": "add", "sub": "sub", "plus": "add", "minus": "sub"})
STUDENT_TASK = ModularTask(p=P, operators={"add": "add", "sub": "sub"}, vocab_operators=("minus", "plus"))
MARKER = ".m2kt-demo"  # marks a directory this command made, so a rerun may replace it


def probes(op: str, n: int = 12) -> tuple[str, ...]:
    """The first ``n`` expressions ``a op b =`` over Z_11 (inputs only: the teacher is never given answers)."""
    return operator_probes(op, P, n)


@dataclass
class DemoReport:
    broker: str
    device: str
    teacher_accuracy: float  # the teacher on every synonym expression
    teacher_held_out: float  # the teacher on its own held-out split
    student_before: dict[str, float]  # synonym -> accuracy
    student_after: dict[str, float]
    student_known_before: float  # add / sub, which the student was trained on
    student_known_after: float
    decision: str
    packet_id: str
    packet_bytes: int
    concepts: int
    teacher_probes: int
    labelled_examples: int
    teacher_training_examples: int
    lineage: dict[str, Any]
    receipts: list[dict[str, Any]]
    written: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def pct_of_teacher(self) -> float:
        after = sum(self.student_after.values()) / len(self.student_after)
        return 100.0 * after / self.teacher_accuracy if self.teacher_accuracy else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pct_of_teacher": self.pct_of_teacher}

    def lines(self) -> list[str]:
        before = ", ".join(f"{k} {v:.1%}" for k, v in self.student_before.items())
        after = ", ".join(f"{k} {v:.1%}" for k, v in self.student_after.items())
        parents = self.lineage.get("ancestors") or []
        receipts = "; ".join(f"{r['node']} {r['decision']}" for r in self.receipts) or "none"
        return [
            f"broker        {self.broker}",
            f"teacher       {self.teacher_accuracy:.1%} on the synonym expressions "
            f"({self.teacher_held_out:.1%} on its held-out split)",
            f"student       before: {before} (add/sub {self.student_known_before:.1%})",
            f"              after:  {after} (add/sub {self.student_known_after:.1%}) — decision {self.decision}",
            f"% of teacher  {self.pct_of_teacher:.1f}%",
            f"data used     {self.teacher_probes} teacher queries, {self.labelled_examples} of them labelled "
            f"examples the packet shares (the teacher trained on {self.teacher_training_examples})",
            f"packet        {self.packet_id[:16]}… {self.packet_bytes:,} bytes, {self.concepts} concepts, "
            f"topic {TOPIC}",
            f"lineage       parents {len(parents)}; receipts: {receipts}",
            f"device        {self.device}; " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
            "written       " + "\n              ".join(f"{k}: {v}" for k, v in self.written.items()),
        ]


# ----------------------------------------------------------------------------- the broker


@contextlib.contextmanager
def embedded_broker(data_dir: Path) -> Iterator[tuple[str, str]]:
    """The embedded default (SQLite + local blobs in ``data_dir``) served on a free loopback port.

    Yields (base URL, admin token); stops the server on the way out."""
    import uvicorn

    from m2kt.broker.app import create_app
    from m2kt.broker.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=None, storage_url=None, upload_rate_per_minute=0)
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise DemoError("the embedded broker did not start")
            time.sleep(0.02)
        token_file = data_dir / "admin-token"
        yield f"http://127.0.0.1:{port}", token_file.read_text().strip()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ----------------------------------------------------------------------------- the steps


def accuracy(student: Any, texts: list[str], answers: list[str]) -> float:
    """The share of ``texts`` the student answers right."""
    return float(student.accuracy(texts, answers))


def _synonym_cases() -> dict[str, tuple[list[str], list[str]]]:
    """synonym -> (every expression with it, the answers)."""
    cases = {}
    for word, op in SYNONYMS.items():
        examples = [e for e in STUDENT_TASK.examples() if e.operator == op]
        texts = [" ".join(e.tokens).replace(f" {op} ", f" {word} ") for e in examples]
        cases[word] = (texts, [e.answer for e in examples])
    return cases


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(f"{out} exists and was not made by m2kt demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by m2kt demo; a rerun replaces this directory\n")


@dataclass
class _Nodes:
    teacher: Any  # BrokerClient with the teacher's token
    student: Any
    teacher_key: Any  # SigningKey


def register_nodes(broker_url: str, admin_token: str, out: Path) -> _Nodes:
    """A teacher and a student node (unique names), each with a fresh key registered by itself."""
    from m2kt.format.keys import generate_keypair, load_signing_key
    from m2kt.sdk.client import BrokerClient

    suffix = secrets.token_hex(3)
    clients = []
    with BrokerClient(broker_url, admin_token, quiet=True) as admin:
        for role in ("teacher", "student"):
            created = admin.create_node(f"demo-{role}-{suffix}", role)
            paths = generate_keypair(out / "keys", role)
            key = load_signing_key(paths.private)
            client = BrokerClient(broker_url, created.token.token, quiet=True)
            client.register_key(key)
            clients.append((client, key))
    (teacher, teacher_key), (student, _) = clients
    return _Nodes(teacher, student, teacher_key)


def train_models(device: str) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """The teacher (d=64, L=2, seed 0; knows the synonyms) and the student (d=48, L=3, seed 1; does not)."""
    from m2kt.nn.device import pick_device
    from m2kt.toy.model import TinyConfig
    from m2kt.toy.train import TrainConfig, train_tiny

    train_device = str(pick_device(device))
    teacher, teacher_metrics = train_tiny(
        TEACHER_TASK, TinyConfig.for_task(TEACHER_TASK), TrainConfig(seed=0, steps=600, device=train_device)
    )
    student, student_metrics = train_tiny(
        STUDENT_TASK,
        TinyConfig.for_task(STUDENT_TASK, d_model=48, n_heads=3, n_layers=3),
        TrainConfig(seed=1, steps=600, device=train_device),
    )
    return teacher, teacher_metrics, student, student_metrics


def build_and_publish(teacher: Any, nodes: _Nodes, out: Path) -> tuple[Path, Any]:
    """Operator concepts read at the teacher's embedding layer, signed with its key, published."""
    from m2kt.teacher import ConceptsSpec, NamedProbe, PacketSpec, build_packet

    named = tuple(
        NamedProbe(label=f"token:{op}", inputs=probes(op), position=1) for op in ("add", "sub", "plus", "minus")
    )
    # the student probes itself with the concepts' inputs, so they travel — and count as labelled examples
    spec = PacketSpec(topic=TOPIC, layer="embed", concepts=ConceptsSpec(named=named), private=False)
    (out / "teacher").mkdir(parents=True, exist_ok=True)
    path = build_packet(teacher, spec, nodes.teacher_key, out / "teacher" / "synonyms.m2kt")
    return path, nodes.teacher.publish(path, TOPIC)


def receive_and_ingest(
    core: Any, nodes: _Nodes, packet_id: str, out: Path, device: str, steps: int
) -> tuple[Any, IngestReport, Path]:
    """Subscribe, fetch + verify the packet, ingest it, post the receipt; returns (student, report, path).

    The delivery is acknowledged (the subscription's cursor moves past it) once it has been handled."""
    done: tuple[Any, IngestReport, Path] | None = None
    for delivery in nodes.student.subscribe(TOPIC, name="demo", dest=out / "student" / "inbox", once=True):
        if delivery.kind == "published" and delivery.packet_id == packet_id and delivery.path is not None:
            verify_key = nodes.student.verify_key_for(delivery.record.key_fingerprint)
            student, report = _ingest(core, delivery.path, verify_key, out, device, steps)
            nodes.student.post_receipt(packet_id, report.decision, report.scores(), report.to_json())
            done = (student, report, delivery.path)
    if done is None:
        raise DemoError(f"the subscription never delivered packet {packet_id[:16]}…")
    return done


def _ingest(core: Any, path: Path, verify_key: Any, out: Path, device: str, steps: int) -> tuple[Any, IngestReport]:
    """Algorithm 2 on the verified packet: a linear CAL for the targets 'plus' and 'minus' at the embedding."""
    from m2kt.student import CALConfig, IngestConfig, InjectConfig, ProbeSuite, Student, ingest

    student = Student(core)
    config = IngestConfig(
        targets=["token:plus", "token:minus"],
        cal=CALConfig(kind="linear"),
        inject=InjectConfig(layer="embed"),
        steps=steps,
        device=device,
    )
    suite = ProbeSuite(task=[" ".join(e.tokens) for e in STUDENT_TASK.examples()][::3])
    report = ingest(student, path, config, keys=verify_key, suite=suite)
    student.save_trainable(out / "student" / "ingested.safetensors")
    report.save(out / "student" / "ingest-report.json")
    return student, report


def run_demo(
    out: Path,
    *,
    broker_url: str | None = None,
    admin_token: str | None = None,
    device: str = "auto",
    steps: int = 50,
    say: Callable[[str], None] = print,
) -> DemoReport:
    """Run the demo end to end (see the module docstring); raises DemoError on any failure."""
    import copy

    from m2kt.student import Student

    _prepare_out(out)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    @contextlib.contextmanager
    def step(name: str, label: str) -> Iterator[None]:
        say(f"… {label}")
        t0 = time.perf_counter()
        try:
            yield
        except DemoError:
            raise
        except Exception as exc:  # any failure ends the demo with the step that failed named
            raise DemoError(f"{label}: {type(exc).__name__}: {exc}") from exc
        seconds[name] = time.perf_counter() - t0

    with contextlib.ExitStack() as stack:
        if broker_url is None:
            with step("broker", "starting the embedded broker (SQLite + local blobs) on a free loopback port"):
                broker_url, admin_token = stack.enter_context(embedded_broker(out / "broker"))
        elif not admin_token:
            raise DemoError("--broker needs an admin token: --token or M2KT_TOKEN")
        assert admin_token is not None
        with step("nodes", "registering a teacher and a student node, each with its own key"):
            nodes = register_nodes(broker_url, admin_token, out)
            stack.callback(nodes.teacher.close)
            stack.callback(nodes.student.close)
        with step("train", "training the teacher (knows plus/minus) and the student (does not)"):
            teacher, teacher_metrics, core, _ = train_models(device)
        cases = _synonym_cases()
        teacher_view = Student(copy.deepcopy(teacher))
        teacher_acc = sum(accuracy(teacher_view, *cases[w]) for w in SYNONYMS) / len(SYNONYMS)
        before_view = Student(copy.deepcopy(core))
        before = {w: accuracy(before_view, *cases[w]) for w in SYNONYMS}
        known = [e for e in STUDENT_TASK.examples()]
        known_texts, known_answers = [" ".join(e.tokens) for e in known], [e.answer for e in known]
        known_before = accuracy(before_view, known_texts, known_answers)
        with step("publish", "extracting operator concepts, signing and publishing the packet"):
            path, record = build_and_publish(teacher, nodes, out)
        with step("ingest", "student: subscribing, fetching, verifying, ingesting, posting the receipt"):
            student, ingest_report, inbox_path = receive_and_ingest(core, nodes, record.id, out, device, steps)
        after = {w: accuracy(student, *cases[w]) for w in SYNONYMS}
        report = DemoReport(
            broker=broker_url,
            device=ingest_report.device,
            teacher_accuracy=teacher_acc,
            teacher_held_out=float(teacher_metrics["test_accuracy"]),
            student_before=before,
            student_after=after,
            student_known_before=known_before,
            student_known_after=accuracy(student, known_texts, known_answers),
            decision=ingest_report.decision,
            packet_id=record.id,
            packet_bytes=record.size,
            concepts=len(record.manifest["concepts"]),
            teacher_probes=int(record.manifest["data_usage"]["probe_count"]),
            labelled_examples=int(record.manifest["data_usage"].get("labelled_examples", 0)),
            teacher_training_examples=int(teacher_metrics["n_train"]),
            lineage=nodes.student.lineage(record.id).model_dump(mode="json"),
            receipts=[
                {"node": r.node, "decision": r.decision, "scores": r.scores} for r in nodes.student.receipts(record.id)
            ],
            written={
                "keys": str(out / "keys"),
                "packet (teacher)": str(path),
                "packet (student inbox, verified)": str(inbox_path),
                "ingested weights": str(out / "student" / "ingested.safetensors"),
                "ingestion report": str(out / "student" / "ingest-report.json"),
                "this report": str(out / "demo-report.json"),
                **({"broker data": str(out / "broker")} if (out / "broker").exists() else {}),
            },
        )
        report.seconds = {**seconds, "total": time.perf_counter() - started}
        (out / "demo-report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        return report
