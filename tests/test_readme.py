"""The README's two quick-start commands are what CI runs."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_quick_start_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install") and "train_net.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_install_and_test_command():
    ci = (REPO / ".ci/run").read_text()
    install, test = quick_start_commands()
    assert install.split(" && ")[0] in ci.splitlines()
    assert any(line.startswith(test) for line in ci.splitlines())
    config = install.split("--config-file ")[1].split()[0]
    assert (REPO / config).is_file()
