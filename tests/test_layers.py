"""The structure is the design: one ``m2kt`` namespace, the packet format at the bottom, no import running
backwards, no cycle — read from the source, and checked in fresh interpreters for what actually loads.

``python -m pytest tests/test_layers.py -s`` prints the layers as they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.import_graph import ALLOWED, FOREIGN_TOP_LEVEL, LAYERS, Graph, build_graph, declared_packages, describe


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


def test_print_the_layers(graph: Graph) -> None:
    print("\n" + describe(graph))
    assert graph.modules


def test_every_module_belongs_to_a_layer(graph: Graph) -> None:
    unplaced = sorted(m for m in graph.modules if m != "m2kt" and graph.layer_of(m) is None)
    assert unplaced == [], f"modules outside every layer of tests/import_graph.py: {unplaced}"


def test_no_import_runs_backwards(graph: Graph) -> None:
    wrong = []
    for module, targets in sorted(graph.edges.items()):
        src = graph.layer_of(module)
        for target in sorted(targets):
            dst = graph.layer_of(target)
            if target == "m2kt" or dst is None or dst == src or src is None:
                continue
            if dst not in ALLOWED[src]:
                wrong.append(f"{module} ({src}) imports {target} ({dst})")
    assert wrong == [], "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycle(graph: Graph) -> None:
    assert graph.cycles() == []


def test_the_student_never_reaches_the_teacher(graph: Graph) -> None:
    students = [m for m in graph.modules if graph.layer_of(m) == "student"]
    reached = {m: sorted(t for t in graph.reachable(m) if graph.layer_of(t) == "teacher") for m in students}
    assert {m: r for m, r in reached.items() if r} == {}


def test_nothing_in_the_package_imports_tests_or_an_old_top_level_name(graph: Graph) -> None:
    foreign = {m: sorted(graph.external[m] & set(FOREIGN_TOP_LEVEL)) for m in graph.modules}
    assert {m: f for m, f in foreign.items() if f} == {}


#: The broker modules that may know the web framework: the app, its dependencies, handlers, docs and routes.
WEB_MODULES = ("m2kt.broker.app", "m2kt.broker.deps", "m2kt.broker.handlers", "m2kt.broker.docs", "m2kt.broker.routes")


def test_the_broker_domain_code_knows_no_web_framework(graph: Graph) -> None:
    broker = [m for m in graph.modules if graph.layer_of(m) == "broker"]
    domain = [m for m in broker if not any(m == w or m.startswith(w + ".") for w in WEB_MODULES)]
    assert {
        m: sorted(graph.external[m] & {"fastapi", "starlette"})
        for m in domain
        if graph.external[m] & {"fastapi", "starlette"}
    } == {}
    assert "m2kt.broker.services.upload" in domain and "m2kt.broker.storage.s3" in domain


def test_the_root_package_imports_nothing(graph: Graph) -> None:
    assert graph.edges["m2kt"] == set()


def test_pyproject_lists_every_package(graph: Graph) -> None:
    packages = sorted(m for m, p in graph.modules.items() if p.name == "__init__.py")
    assert sorted(declared_packages()) == packages
    assert set(LAYERS) == set(ALLOWED)


def _loaded_after(code: str, tmp_path: Path) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter, outside the repository; which modules did it load?"""
    probe = (
        f"{code}\nimport json, sys\n"
        "mods = sorted(sys.modules)\n"
        "print(json.dumps({'m2kt': [m for m in mods if m == 'm2kt' or m.startswith('m2kt.')],"
        " 'torch': [m for m in mods if m.split('.')[0] == 'torch'],"
        " 'httpx': [m for m in mods if m.split('.')[0] == 'httpx'],"
        " 'fastapi': [m for m in mods if m.split('.')[0] in ('fastapi', 'starlette', 'sqlalchemy')],"
        " 'top': sorted({m.split('.')[0] for m in mods})}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _outside(allowed: tuple[str, ...], loaded: list[str]) -> list[str]:
    return [m for m in loaded if m != "m2kt" and not any(m == a or m.startswith(a + ".") for a in allowed)]


def test_the_broker_app_loads_neither_torch_nor_the_sdk(tmp_path: Path) -> None:
    loaded = _loaded_after(
        "from m2kt.broker.app import create_app\n"
        "from m2kt.broker.settings import Settings\n"
        f"create_app(Settings(data_dir={str(tmp_path / 'data')!r}))",
        tmp_path,
    )
    assert loaded["torch"] == []
    assert _outside(("m2kt.errors", "m2kt.format", "m2kt.broker"), loaded["m2kt"]) == []


def test_the_format_layer_loads_neither_torch_nor_httpx(tmp_path: Path, graph: Graph) -> None:
    modules = [m for m in graph.modules if graph.layer_of(m) in ("base", "format")]
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules), tmp_path)
    assert loaded["torch"] == [] and loaded["httpx"] == [] and loaded["fastapi"] == []
    assert _outside(("m2kt.errors", "m2kt._fields", "m2kt.format"), loaded["m2kt"]) == []


def test_the_sdk_loads_neither_torch_nor_the_server(tmp_path: Path) -> None:
    loaded = _loaded_after("import m2kt\nm2kt.BrokerClient, m2kt.AsyncBrokerClient, m2kt.verify_packet", tmp_path)
    assert loaded["torch"] == [] and loaded["fastapi"] == []
    assert _outside(("m2kt.errors", "m2kt.format", "m2kt.sdk"), loaded["m2kt"]) == []


def test_import_m2kt_loads_nothing_else(tmp_path: Path) -> None:
    loaded = _loaded_after("import m2kt\nassert m2kt.__version__", tmp_path)
    assert loaded["m2kt"] == ["m2kt"] and loaded["torch"] == [] and loaded["httpx"] == []


def test_the_cli_loads_only_what_listing_its_commands_needs(tmp_path: Path) -> None:
    """``m2kt --help`` / ``--version`` import the command modules only: no numpy, ml_dtypes, httpx, SQLAlchemy,
    Alembic or torch (together about 1.5 s of CPU on a 2-core machine). Each command imports its own
    dependencies when it runs. Checked by module set, not by time, so a busy machine cannot break it."""
    heavy = {"numpy", "ml_dtypes", "httpx", "sqlalchemy", "alembic", "torch", "fastapi", "uvicorn", "boto3"}
    assert sorted(heavy & set(_loaded_after("from m2kt.cli.main import app", tmp_path)["top"])) == []
    version = subprocess.run(
        [sys.executable, "-m", "m2kt.cli.main", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert version.returncode == 0 and version.stdout.startswith("m2kt "), version.stderr
