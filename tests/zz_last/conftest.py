"""Keep this directory's tests at the very end of the run, whatever order they were collected in.

They scan what every gateway of the run left behind (``tests.harness.gateway.STARTED``), so they
must run after every test that starts one. The directory's name already sorts last under
``tests/``; this hook also covers ``pytest tests/zz_last tests/e2e`` and plugins that reorder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if last:
        items[:] = [item for item in items if item not in last] + last
