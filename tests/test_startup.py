"""`landscape --help` stays fast: no torch before a command is chosen, no plotting or data libraries for `measure`.

Each check imports the CLI in a fresh interpreter and asserts what it imported (behaviour, not wall time).
"""

import json
import subprocess
import sys

import pytest

import landscape
from analysis.cli import COMMANDS, build_parser, invoked_command
from tests.helpers import run_cli

PROBE = """
import json, sys
from analysis.cli import build_parser, main
code = 0
try:
    {call}
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "imported": sorted(m for m in {modules!r} if m in sys.modules)}}))
"""


def imported_by(call: str, modules: list[str]) -> tuple[object, list[str], str]:
    """Run the statement `call` in a fresh interpreter that imported analysis.cli.

    Returns its exit code (0 unless it raised SystemExit), which of `modules` it imported, and its output.
    """
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(call=call, modules=modules)], capture_output=True, text=True, timeout=300
    )
    *output, last = result.stdout.splitlines()
    report = json.loads(last)
    return report["code"], report["imported"], "\n".join(output)


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--version"], 0), ([], 2), (["bogus"], 2), (["-h", "measure"], 0)])
def test_top_level_does_not_import_torch(argv, code):
    exit_code, imported, output = imported_by(f"main({argv!r})", ["torch", "numpy"])
    assert exit_code == code and imported == []
    if argv == ["--version"]:
        assert output == f"landscape {landscape.__version__}"


def test_measure_arguments_skip_plotting_and_data_libraries():
    heavy = ["matplotlib", "h5py", "sklearn", "scipy.stats"]
    code, imported, _ = imported_by("build_parser(['measure']).parse_args(['measure', 'x.pt'])", heavy)
    assert code == 0 and imported == []


@pytest.mark.cli
def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert all(f"    {name} " in result.stdout for name in COMMANDS)


def test_the_invoked_command_parses_as_in_the_full_parser():
    argv = ["measure", "x.pt", "--metrics", "eig", "--k", "2"]
    assert invoked_command(argv) == ["measure"]
    assert vars(build_parser(invoked_command(argv)).parse_args(argv)) == vars(build_parser().parse_args(argv))
    assert invoked_command(["--help", "measure"]) == invoked_command(["bogus"]) == invoked_command([]) == []
