"""The README's promise, and every ```python block of README.md and docs/*.md runs: each file's
blocks in order, as one script in a folder of its own, all the files in one process of their
own (tests/processes.py: TensorFlow already imported)."""

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests import processes

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


# Each page's script runs with fresh globals (runpy), in its own working directory; the
# first one that fails is named with its traceback.
RUNNER = textwrap.dedent("""
    import os, runpy, sys, traceback
    for script in sys.argv[1:]:
        os.chdir(os.path.dirname(script))
        print(f"==== {os.path.basename(script)}", flush=True)
        try:
            runpy.run_path(script, run_name="__main__")
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: {os.path.basename(script)}", flush=True)
            sys.exit(1)
    """)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_python_blocks_of_every_page_run(tmp_path):
    scripts = []
    for page in PAGES:
        blocks = python_blocks(page)
        if blocks:
            folder = tmp_path / page.stem
            folder.mkdir()
            scripts.append(folder / f"{page.stem}_examples.py")
            scripts[-1].write_text("\n\n".join(blocks))
    assert len(scripts) >= 4, scripts  # README, checkpoints, deployment, model, training
    result = processes.run([sys.executable, "-c", RUNNER, *map(str, scripts)], cwd=tmp_path,
                           timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("==== ") == len(scripts)
