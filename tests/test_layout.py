"""The package layout is the architecture: what may import what, and what a cell installs.

`docs/architecture.md` draws a pure core with the sources, backends, agent and CI-facing
commands around it, and the lab as a distribution of its own.  These tests keep the drawing
true: a core module that starts reading files, or a cell install that starts carrying the
lab, fails here rather than in a review.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reconciler"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (a lazy import inside a function counts)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


# What the core may use from the rest of the package: nothing that reads, writes or waits.
CORE_MAY_IMPORT = (
    "reconciler.core",
    "reconciler.escape",
    "reconciler.forkpool",  # splits pure work across forks; results are the same data
    "reconciler.policy.findings",
)
# The renderers are pure text-from-data; diff shows the dataplane lines a PR changes.
CORE_MAY_IMPORT_RENDER = ("reconciler.backends.iptables.render",)
IO_MODULES = {"subprocess", "os", "pathlib", "shutil", "tempfile", "time", "datetime", "urllib"}


@pytest.mark.parametrize("path", _modules(PACKAGE / "core"), ids=lambda p: p.name)
def test_the_core_reads_nothing_and_imports_no_edge(path: Path) -> None:
    for module in _imports(path):
        top = module.split(".")[0]
        assert top not in IO_MODULES, f"{path.name} imports {module}: the core does no I/O"
        if top == "reconciler":
            allowed = CORE_MAY_IMPORT + CORE_MAY_IMPORT_RENDER
            assert module.startswith(allowed), f"{path.name} imports {module}, an edge"


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_a_cell_installs_imports_the_lab(path: Path) -> None:
    assert not any(m.split(".")[0] == "asgctl_lab" for m in _imports(path)), path


def test_the_sources_and_ci_commands_do_not_reach_into_the_agent() -> None:
    """The CI plan and the agent share the core and the status contract, never each other."""
    for folder in ("sources", "ci", "status", "policy", "backends"):
        for path in _modules(PACKAGE / folder):
            for module in _imports(path):
                assert not module.startswith("reconciler.agent"), f"{path} imports {module}"


@pytest.mark.requires("git")
def test_a_cells_wheel_carries_no_lab(tmp_path: Path) -> None:
    """`pip install asgctl` on a cell gets the product and its data files, not the lab."""
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("asgctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "asgctl_lab" in n or "/lab/" in n], names
    assert "reconciler/ci/report/templates/plan.md.j2" in names
    assert "reconciler/schemas/cell-status.schema.json" in names
    assert "reconciler/core/compile.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "asgctl.commands" not in zipfile.ZipFile(wheel).read(entry_points).decode()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-c", "from reconciler.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _plugin(tmp_path: Path, entry_points: str, module: str) -> None:
    """A distribution as pip would leave it: a dist-info folder and a module on the path."""
    info = tmp_path / "asgctl_plugin_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: asgctl-plugin-test\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (tmp_path / "asgctl_plugin_test.py").write_text(textwrap.dedent(module))


PLUGIN_MODULE = """
    import click

    @click.command()
    def hello():
        "Say hello from a plugin."
        click.echo("hello from the plugin")

    @click.command()
    def validate():
        click.echo("a plugin's validate")

    not_a_command = 42
"""


def test_the_lab_answers_as_asgctl_lab_when_installed() -> None:
    help_text = subprocess.run(
        [sys.executable, "-c", "from reconciler.cli import main; main()", "lab", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert "network namespaces" in help_text.stdout


def test_a_plugin_adds_a_command_but_never_replaces_a_built_in_one(tmp_path: Path) -> None:
    _plugin(
        tmp_path,
        """
        [asgctl.commands]
        hello = asgctl_plugin_test:hello
        validate = asgctl_plugin_test:validate
        """,
        PLUGIN_MODULE,
    )
    listed = _cli(tmp_path, "--help")
    assert "hello" in listed.stdout and "Say hello from a plugin." in listed.stdout
    assert _cli(tmp_path, "hello").stdout == "hello from the plugin\n"
    own = _cli(tmp_path, "validate", "--help")
    assert "a plugin's validate" not in own.stdout
    assert "JSON Schemas" in own.stdout


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("asgctl_plugin_missing:hello", "cannot be imported"),
        ("asgctl_plugin_test:not_a_command", "is not a click command"),
    ],
)
def test_a_broken_plugin_is_named_not_a_traceback(
    tmp_path: Path, target: str, message: str
) -> None:
    _plugin(tmp_path, f"[asgctl.commands]\nbroken = {target}\n", PLUGIN_MODULE)
    result = _cli(tmp_path, "broken")
    assert result.returncode == 1
    assert message in result.stderr and target in result.stderr
    assert "Traceback" not in result.stderr
    assert _cli(tmp_path, "validate", "--help").returncode == 0
