"""Write completions/mk.{bash,zsh,fish} from the app itself (`make completions`).

The scripts ask `mk` for candidates at completion time, so new commands and
options complete without regenerating; tests/test_completions.py checks that
the committed files are what the app prints today.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")
ROOT = Path(__file__).resolve().parent.parent


def completion_script(shell: str) -> str:
    mk = Path(sys.executable).with_name("mk")
    # typer picks the shell from the option's value only with detection disabled.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    return subprocess.run([str(mk), "--show-completion", shell], env=env, check=True,
                          capture_output=True, text=True).stdout


def main() -> None:
    for shell in SHELLS:
        path = ROOT / "completions" / f"mk.{shell}"
        path.write_text(completion_script(shell))
        print(path)


if __name__ == "__main__":
    main()
