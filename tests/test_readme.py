"""The README's quick-start code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__main__"})
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert out[0].startswith("[1003, 1017] []")
    assert out[-1] == "[1003]"
    assert (tmp_path / "amnesia_demo" / "_amnesia_store" / "manifest.json").exists()


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in text and ci.strip().endswith("python -m pytest")
    assert "python recipes/quickstart.py" in text
