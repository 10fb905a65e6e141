"""The README's Python quickstart runs as written (on the small random BERT instead of MiniLM)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_block_runs_and_verifies() -> None:
    text = README.read_text()
    section = text[text.index("## Python quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'load_model("minilm"' in code
    code = code.replace('load_model("minilm"', 'load_model("random:bert"')
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), scope)
    assert scope["report"].passed, scope["report"].failures()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("True ")
    assert len(scope["sol"].costates) == scope["system"].n_layers + 1
