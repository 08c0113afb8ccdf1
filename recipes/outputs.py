"""What a study run writes: results.json, run.json (with what ran it), results.md and results.png."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_amnesia
from recipes.evaluation import markdown_table, plot_results


def code_version(argv: list[str] | None = None) -> dict:
    """The command line (the script and `argv`, the arguments its main() parsed; default the
    process's), the library's version, and the git commit of the code that ran (with `dirty` True
    when tracked files had uncommitted changes; both None outside a git checkout)."""
    line = sys.argv if argv is None else [*sys.argv[:1], *argv]
    facts = {"argv": line, "hf_amnesia_version": hf_amnesia.__version__, "commit": None, "dirty": None}
    root = Path(__file__).resolve().parent.parent
    try:
        facts["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        facts["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return facts


def write_outputs(results: dict, meta: dict, output_dir: str, argv: list[str] | None = None) -> str:
    """results.json, run.json (with `code_version(argv)`), results.md and results.png in output_dir;
    returns the markdown table."""
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(results)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(output_dir, "run.json"), "w") as f:
        json.dump({**meta, **code_version(argv)}, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot_results(results, os.path.join(output_dir, "results.png"))
    return table
