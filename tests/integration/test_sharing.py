"""Instances share engines per database URL and event loop; several loops in turn just work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import OrderingFactory
from tests.support import make_event


async def test_instances_on_one_url_share_one_engine(make_ordering: OrderingFactory) -> None:
    first, second = make_ordering("one"), make_ordering("two")
    await first.event_has_been_seen(make_event())
    await second.event_has_been_seen(make_event())
    assert first._store is not None
    assert second._store is not None
    assert first._store.engine is second._store.engine


async def test_closing_one_instance_leaves_the_others_working(
    make_ordering: OrderingFactory,
) -> None:
    first, second = make_ordering(), make_ordering()
    event = make_event()
    await first.record_event_as_seen(event)
    assert await second.event_has_been_seen(event)
    await first.close()
    assert await second.event_has_been_seen(event), "the shared engine was not disposed"


def test_several_event_loops_in_turn_need_no_closing(sqlite_template: Path, tmp_path: Path) -> None:
    """Two asyncio.run calls, nothing closed in between or after: no warning, no hang."""
    database = tmp_path / "loops.db"
    database.write_bytes(sqlite_template.read_bytes())
    script = textwrap.dedent(
        f"""
        import asyncio, warnings
        warnings.simplefilter("error")
        from ordering_sql import CausalOrdering
        from tests.support import make_event

        URL = "sqlite+aiosqlite:///{database}"
        event = make_event()

        async def first() -> None:
            await CausalOrdering("loops", database_url=URL).record_event_as_seen(event)

        async def second() -> bool:
            return await CausalOrdering("loops", database_url=URL).event_has_been_seen(event)

        asyncio.run(first())
        assert asyncio.run(second())
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "ResourceWarning" not in result.stderr
    assert "Event loop is closed" not in result.stderr
