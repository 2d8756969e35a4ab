"""The built wheel works on its own: installed in a fresh venv, migrations and all, in any cwd."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from ordering_sql.migration import head_revision

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]


def run(args: list[str | Path], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def _environment() -> dict[str, str]:
    # Nothing may point the fresh venv back at this checkout or the test venv.
    dropped = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    return {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith("ORDERING_SQL_")
    }


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    elsewhere: Path  # a directory far from the checkout

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "ordering-sql"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel with this venv's hatchling and install it into a brand-new venv."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            dist,
            PROJECT,
        ],
        cwd=root,
        timeout=120,
    )
    (wheel,) = dist.glob("ordering_sql-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=root, timeout=120)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], cwd=root, timeout=240)

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, venv, elsewhere)


def test_wheel_carries_the_migration_scripts(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    assert "ordering_sql/migrations/env.py" in names
    assert "ordering_sql/migrations/versions/0001_initial.py" in names
    assert "ordering_sql/py.typed" in names


def test_wheel_declares_the_console_script(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = wheel.read(entry_points).decode()
    assert "ordering-sql = ordering_sql.cli:main" in text


def test_installed_copy_is_used_not_the_checkout(installed: Installed) -> None:
    code = (
        "import ordering_sql, ordering_sql.migration as m;"
        "print(ordering_sql.__file__); print(m.script_location())"
    )
    result = run([installed.python, "-c", code], cwd=installed.elsewhere, timeout=60)
    module_file, scripts = result.stdout.splitlines()
    site_packages = installed.venv.resolve()
    assert Path(module_file).resolve().is_relative_to(site_packages)
    assert Path(scripts).resolve().is_relative_to(site_packages)
    assert Path(scripts).name == "migrations"
    assert Path(scripts).parent.name == "ordering_sql"


def test_installed_requirements_are_consistent(installed: Installed) -> None:
    run([installed.python, "-m", "pip", "check"], cwd=installed.elsewhere, timeout=60)


def test_installed_cli_migrates_and_reports_status(installed: Installed, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"

    migrated = run(
        [installed.script, "migrate", "--database-url", url], cwd=installed.elsewhere, timeout=60
    )
    status = run(
        [installed.script, "status", "--database-url", url], cwd=installed.elsewhere, timeout=60
    )

    assert f"is at revision {head_revision()}" in migrated.stderr
    assert (tmp_path / "fresh.db").is_file()
    assert "No ordering state" in status.stdout
    assert not (installed.elsewhere / "ordering.db").exists()
