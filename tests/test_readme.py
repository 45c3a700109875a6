"""Every ```python block in README.md runs, in order, in one fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "python3 dev.py run" in text and "python3 dev.py test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 dev.py test" in ci


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert blocks, "README.md has no python examples"
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
