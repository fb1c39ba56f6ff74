"""The wheel is one namespace, ``m2kt``, and works installed away from the repository.

Built from a copy of the repository's package folders (what the Dockerfile copies), installed with pip into
a new virtual environment that borrows this environment's dependencies through a ``.pth`` line (a path
added that way is searched, but this environment's editable install of m2kt is not activated), and run from
an empty directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.import_graph import ROOT

SOURCES = ("pyproject.toml", "README.md", "client", "broker", "migrations", "benchmarks")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src, cwd=src)
    (built,) = out.glob("m2kt-*.whl")
    return built


def test_the_wheel_claims_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert archive.read(f"{info}/top_level.txt").decode().split() == ["m2kt"]
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert top_level == {"m2kt"}
    assert "m2kt = m2kt.cli.main:app" in entry_points
    for needed in (
        "m2kt/broker/app.py",
        "m2kt/migrations/script.py.mako",
        "m2kt/migrations/versions/",
        "m2kt/py.typed",
    ):
        assert any(n.startswith(needed) for n in names), needed
    assert not any(n.startswith("m2kt/tests") or "/results/" in n for n in names)


def test_installed_in_a_fresh_venv_it_runs_from_an_empty_directory(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    fresh_site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    (fresh_site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "M2KT_"))}
    env["M2KT_DATABASE_URL"] = f"sqlite:///{tmp_path / 'new' / 'm2kt.db'}"

    where = _run(python, "-c", "import m2kt, m2kt.broker.app; print(m2kt.__file__)", cwd=empty, env=env).stdout
    assert Path(where.strip()).is_relative_to(env_dir), where
    m2kt = env_dir / "bin" / "m2kt"
    assert "--broker" in _run(m2kt, "demo", "--help", cwd=empty, env=env).stdout
    migrated = _run(m2kt, "broker", "migrate", cwd=empty, env=env).stdout
    assert (
        migrated.startswith("schema upgraded from an empty database to ") and (tmp_path / "new" / "m2kt.db").is_file()
    )
    head = migrated.split()[7]
    assert migrated.strip() == f"schema upgraded from an empty database to {head} (head is {head})", migrated
    assert "--quick" in _run(m2kt, "bench", "transfer", "--help", cwd=empty, env=env).stdout
    assert list(empty.iterdir()) == []  # nothing written where it ran


def _requirement_name(requirement: str) -> str:
    import re

    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    return re.sub(r"-pypi-part-\d+$", "", name)  # the five all-mpnet-base-v2 parts are one row entry


def test_the_readme_extras_table_matches_pyproject() -> None:
    """Every extra in pyproject.toml has a README row naming each package it pulls in (issue 19: the table had
    drifted), and the declared licence ships as a file."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| extra | for | pulls in |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for extra in re.findall(r"`([a-z]+)`", cells[0]) or ["core"]:
            rows[extra] = cells[2].lower().replace("_", "-")
    extras = project["optional-dependencies"]
    assert set(rows) == set(extras) | {"core"}, sorted(set(rows) ^ (set(extras) | {"core"}))
    for extra, requirements in [("core", project["dependencies"]), *extras.items()]:
        for requirement in requirements:
            if requirement.startswith("m2kt["):
                for inner in requirement[5:].split("]")[0].split(","):
                    assert f"`{inner}`" in rows[extra] or extra == "test", (extra, inner)
            else:
                assert _requirement_name(requirement) in rows[extra], (extra, requirement)
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
