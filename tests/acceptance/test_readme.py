"""The README's promises: its opening commands and its usage example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_setup_and_test_commands() -> None:
    first = _blocks("bash")[0].strip().splitlines()
    assert README.index("```bash") < README.index("## "), "the commands come before any section"
    setup = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'"
    assert first == [f"{setup} && .venv/bin/ordering-sql demo", ".venv/bin/python -m pytest"]


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _blocks("bash")[0].strip().splitlines()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command


def _run(example: str, folder: Path) -> list[str]:
    """Run a README example as a script in ``folder``; the lines it printed."""
    script = folder / "example.py"
    script.write_text(example)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_usage_example_runs_and_orders(tmp_path: Path) -> None:
    printed = _run(_blocks("python")[0], tmp_path)
    assert printed == ["handling order.placed", "handling order.paid"]
    assert (tmp_path / "ordering.db").exists(), "the example uses the embedded default"


def test_exactly_once_example_writes_each_order_row_once(tmp_path: Path) -> None:
    """The "Exactly-once effects" example: an early follower and a duplicate of each event,
    and one ``orders`` row per event, the leader's first."""
    (example,) = [block for block in _blocks("python") if "exactly_once(" in block]
    assert _run(example, tmp_path) == ["['order.placed', 'order.paid']"]
    assert (tmp_path / "shop.db").exists()
