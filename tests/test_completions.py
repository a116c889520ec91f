"""completions/ holds what the app prints today, and the scripts really complete."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_completions import ROOT, SHELLS, completion_script  # noqa: E402


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completions_are_current(shell):
    committed = (ROOT / "completions" / f"mk.{shell}").read_text()
    assert committed == completion_script(shell), "run `make completions`"


def test_bash_completion_offers_commands_and_options():
    mk = Path(sys.executable).with_name("mk")
    env = {**os.environ, "_MK_COMPLETE": "complete_bash", "COMP_WORDS": "mk in", "COMP_CWORD": "1"}
    out = subprocess.run([str(mk)], env=env, capture_output=True, text=True).stdout
    assert "info" in out.split()
    env.update(COMP_WORDS="mk info --li", COMP_CWORD="2")
    out = subprocess.run([str(mk)], env=env, capture_output=True, text=True).stdout
    assert "--lineage" in out.split()
