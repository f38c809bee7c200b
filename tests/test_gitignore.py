"""The folders the README's commands write are ignored by git, so following it leaves a clean checkout."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ignored(path: str) -> bool:
    result = subprocess.run(["git", "check-ignore", "--quiet", "--no-index", path], cwd=ROOT)
    assert result.returncode in (0, 1), f"git check-ignore failed on {path!r}"
    return result.returncode == 0


def test_readme_output_folders_are_ignored():
    folders = set(re.findall(r"--output (\S+/)", (ROOT / "README.md").read_text())) | {"export/", "report/"}
    for folder in sorted(folders):
        assert _ignored(folder + "config.json"), f"{folder} (a README output folder) is not in .gitignore"
    assert not _ignored("diffv2_lit/inference/export.py")  # the source stays tracked
