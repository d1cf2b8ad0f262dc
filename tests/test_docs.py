"""Every Python example in the README and docs/ runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_examples_run(path: pathlib.Path) -> None:
    blocks = BLOCK.findall(path.read_text())
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - shown in the failure
            pytest.fail(f"{path.name} block {i} failed: {e!r}\n{block}")
    if path.name == "README.md":
        # The outbox quickstart writes a stream to the shared Redis; take it away again.
        import redis

        with redis.Redis() as client:
            client.delete("readme:orders")
