"""The README's promise, and every ```python block of README.md and docs/*.md runs: each file's
blocks in order, in one fresh interpreter of their own."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_readme_has_the_two_commands_and_a_short_front_page():
    text = (ROOT / "README.md").read_text()
    assert "python3 dev.py run" in text and "python3 dev.py test" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 dev.py test" in ci
    assert len(text.splitlines()) < 200
    for link in re.findall(r"\]\((docs/[^)#]+|ARCHITECTURE\.md)", text):
        assert (ROOT / link).is_file(), link


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path):
    script = tmp_path / f"{page.stem}_examples.py"
    script.write_text("\n\n".join(python_blocks(page)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
