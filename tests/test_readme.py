"""The README's Python examples run as written, in order (each builds on the imports of the
ones before it, as a reader types them): an example the code no longer matches fails here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not README.exists(), reason="not a source checkout")
def test_the_readmes_python_examples_run_in_order():
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert len(blocks) >= 3  # the API, the wire and bit-plane training
    scope: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), scope)
    # what the examples say they leave behind
    assert scope["new_bits"] == scope["layer"].bits and 1 <= scope["new_bits"] <= 4
    assert scope["global_state"]["conv1.weight"].shape == (64, 3, 3, 3)
