"""What was reviewed is what runs: CI and the cells read one file set, by one reader.

CI validates and tests a pull request; the agent on each cell compiles the merged commit from
git.  Every attack here used to make the two disagree, or made CI read the runner's own files:

* a `policies/` that is itself a symlink (CI read and echoed whatever it pointed at);
* a hidden folder (`policies/.hidden/`) that the folder reader skipped and git did not;
* `x.yaml -> d/../a.txt` with `d` a link: the kernel resolves it to one file, git's lexical
  normalisation to another.

The reader (reconciler/policy/source.py) lists the disk and the git tree into the same shape
and applies one set of rules to both; these tests hold the two side by side.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.cli import main
from reconciler.core.policytest import run_tests
from reconciler.policy.load import load_folder, load_policy, load_revision
from reconciler.policy.source import LoadErrors, read_folder, read_git
from reconciler.policy.yamlsafe import Limits, LoadError, ParseCache
from tests.policyrepo import commit_all, git, init_repo, write_tree

REPO = Path(__file__).resolve().parent.parent
SECRET = "runner-secret-4f1c9e"  # must never appear in anything asgctl prints

ALLOW_ALL = """
    kind: SecurityGroup
    name: {name}
    globally_enabled: {{running: true, staging: true}}
    rules:
      - {{protocol: all, destination: 0.0.0.0/0}}
"""
HARMLESS = """
    kind: SecurityGroup
    name: {name}
    rules:
      - {{protocol: tcp, destination: 198.51.100.7, ports: "443"}}
"""


def cli(cwd: Path, *args: str):  # type: ignore[no-untyped-def]
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(old)


def policy_checkout(tmp_path: Path) -> Path:
    """A git repo holding a copy of this project's example policies (with their tests)."""
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(REPO / "policies", repo / "policies")
    commit_all(repo, "example policies")
    return repo


def outside_secrets(tmp_path: Path) -> Path:
    """Files on the CI runner, outside the repository, that look like policy."""
    return write_tree(
        tmp_path / "runner",
        {
            "creds.yaml": f"kind: SecurityGroup\nname: x\n{SECRET}: {SECRET}\n",
            "bad.yml": f"token: [{SECRET}\n",
            "sub/deep.yaml": f"kind: Nope\nname: {SECRET}\n",
        },
    )


# --- 2. a symlinked policy folder is refused, and nothing from outside is shown -------------


@pytest.mark.parametrize("fmt", ["text", "github", "json"])
def test_a_symlinked_policy_folder_is_refused_and_nothing_outside_is_read(tmp_path, fmt):
    runner_files = outside_secrets(tmp_path)
    repo = init_repo(tmp_path / "repo")
    os.symlink(runner_files, repo / "policies")
    head = commit_all(repo, "policies is now a link")
    for args in (
        ["validate", "policies"],
        ["validate", "policies", "--rev", head],
        ["test", "policies"],
        ["test", "policies", "--rev", head],
    ):
        result = cli(repo, *args, "--format", fmt)
        assert result.exit_code == 1, (args, result.output)
        assert "the policy folder goes through a symlink (policies)" in result.output, args
        assert "nothing was read" in result.output
        assert SECRET not in result.output, (args, result.output)
        assert str(runner_files) not in result.output


def test_a_symlinked_policy_folder_is_refused_at_any_revision_from_git(tmp_path):
    """The agent reads git with no checkout: the link blob in the commit is what it meets."""
    runner_files = outside_secrets(tmp_path)
    repo = init_repo(tmp_path / "repo")
    write_tree(repo, {"conf/keep.txt": "x"})
    os.symlink(runner_files, repo / "policies")
    os.symlink(runner_files, repo / "conf" / "policies")
    head = commit_all(repo, "links")
    for subdir in ("policies", "conf/policies", "policies/sub"):
        with pytest.raises(LoadError) as err:
            read_git(repo, head, subdir)
        assert "the policy folder goes through a symlink" in err.value.message
        assert SECRET not in str(err.value)
    result = load_revision(repo, head, "policies")
    assert not result.ok and SECRET not in str(result.findings)


def test_a_link_between_the_repository_top_and_the_policy_folder_is_refused_on_disk(tmp_path):
    runner_files = outside_secrets(tmp_path)
    repo = init_repo(tmp_path / "repo")
    os.symlink(runner_files, repo / "conf")
    commit_all(repo, "conf is a link")
    for path in (repo / "conf", repo / "conf" / "sub"):
        result = load_folder(path)
        assert [f.message for f in result.findings] == [
            "the policy folder goes through a symlink (conf); it must be a folder of the "
            "repository, so nothing was read"
        ]
        assert not load_policy(path, "HEAD").ok


def test_outside_git_a_policy_folder_that_is_a_link_is_refused(tmp_path):
    runner_files = outside_secrets(tmp_path)
    os.symlink(runner_files, tmp_path / "policies")
    result = load_folder(tmp_path / "policies")
    assert not result.ok and SECRET not in str(result.findings)
    assert "goes through a symlink (policies)" in result.findings[0].message


# --- 3. CI's folder read and the cells' git read are the same read --------------------------


def test_a_hidden_folder_is_skipped_by_ci_and_by_the_cells_alike(tmp_path):
    """The reported attack: an allow-all group in `policies/.hidden/` passed CI's tests on the
    folder and failed them at `--rev HEAD`, the way the cells would have applied it."""
    repo = policy_checkout(tmp_path)
    write_tree(
        repo,
        {
            "policies/.hidden/allow-all.yaml": ALLOW_ALL.format(name="hidden-folder"),
            "policies/security-groups/.allow-all.yaml": ALLOW_ALL.format(name="hidden-file"),
        },
    )
    head = commit_all(repo, "hide an allow-all group")
    on_disk = read_folder(repo / "policies")
    in_git = read_git(repo, head, "policies")
    assert on_disk == in_git
    assert not any("allow-all" in f.path for f in on_disk)
    disk_result, git_result = load_folder(repo / "policies"), load_policy(repo / "policies", head)
    assert disk_result == git_result and disk_result.ok
    outcomes = [(r.test.name, r.passed) for r in run_tests(disk_result.policy)]
    assert outcomes == [(r.test.name, r.passed) for r in run_tests(git_result.policy)]
    assert outcomes and all(passed for _, passed in outcomes)
    ci = cli(repo, "test", "policies", "--format", "github")
    cells = cli(repo, "test", "policies", "--rev", head, "--format", "github")
    assert ci.exit_code == cells.exit_code == 0
    assert ci.output == cells.output


def test_a_link_through_a_linked_folder_resolves_as_the_kernel_does_from_disk_and_git(tmp_path):
    """`x.yaml -> d/../a.txt` with `d -> sub/deep`: the kernel reads `sub/a.txt` (`..` climbs
    from where `d` led); git's lexical normalisation read `a.txt`, an allow-all group."""
    repo = init_repo(tmp_path / "repo")
    write_tree(
        repo,
        {
            "policies/a.txt": ALLOW_ALL.format(name="allow-all"),
            "policies/sub/a.txt": HARMLESS.format(name="harmless"),
            "policies/sub/deep/keep.txt": "",
        },
    )
    os.symlink("sub/deep", repo / "policies" / "d")
    os.symlink("d/../a.txt", repo / "policies" / "x.yaml")
    head = commit_all(repo, "the d/../ trick")
    assert (repo / "policies" / "x.yaml").read_text().startswith("kind: SecurityGroup\nname: harm")
    on_disk = read_folder(repo / "policies")
    assert on_disk == read_git(repo, head, "policies")
    assert [(f.path, f.data.split(b"\n")[1]) for f in on_disk] == [("x.yaml", b"name: harmless")]
    groups = load_revision(repo, head, "policies").policy.security_groups
    assert [g.name for g in groups] == ["harmless"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/etc/passwd", "symlink points outside the policy tree (/etc/passwd)"),
        ("../secret.yaml", "symlink points outside the policy tree (../secret.yaml)"),
        ("../policies/ok.txt", "symlink points outside the policy tree (../policies/ok.txt)"),
        ("up/../../secret.yaml", "symlink points outside the policy tree (up/../../secret.yaml)"),
        ("up/secret.yaml", "symlink points outside the policy tree (up/secret.yaml)"),
        (".git/config", "symlink goes through a hidden name (.git/config)"),
        (".hidden/allow.txt", "symlink goes through a hidden name (.hidden/allow.txt)"),
        ("missing.txt", "symlink target missing.txt does not exist"),
        ("ok.txt/x", "symlink target ok.txt/x is not a file"),
        ("ok.txt/", "symlink target ok.txt/ is not a file"),
        ("sub", "symlink target sub is not a file"),
        ("loop.yaml", "too many levels of symbolic links"),
    ],
)
def test_refused_links_are_refused_the_same_from_disk_and_from_git(tmp_path, target, message):
    """`up -> ..` climbs out of the folder in one step: refused even though `up/` looks
    lexically inside.  The finding shows the link's own text, never what it points at."""
    repo = init_repo(tmp_path / "repo")
    write_tree(
        repo,
        {
            "secret.yaml": f"{SECRET}: 1\n",
            "policies/ok.txt": HARMLESS.format(name="ok"),
            "policies/sub/keep.txt": "",
            "policies/.hidden/allow.txt": ALLOW_ALL.format(name="hidden"),
        },
    )
    os.symlink("..", repo / "policies" / "up")
    os.symlink("loop.yaml", repo / "policies" / "loop.yaml")
    if target != "loop.yaml":
        os.symlink(target, repo / "policies" / "bad.yaml")
    head = commit_all(repo, "a link")
    errors = []
    for read in (lambda: read_folder(repo / "policies"), lambda: read_git(repo, head, "policies")):
        with pytest.raises(LoadErrors) as err:
            read()
        errors.append([(e.file, e.message) for e in err.value.errors])
    assert errors[0] == errors[1]
    name = "loop.yaml" if target == "loop.yaml" else "bad.yaml"
    assert (name, message) in errors[0]
    assert SECRET not in str(errors)


def test_links_that_are_not_policy_files_are_never_followed(tmp_path):
    """A link to a folder (in or out of the tree) is not walked, from disk or git; a nested
    repository is not part of the tree; a link to a file in the tree is read."""
    runner_files = outside_secrets(tmp_path)
    repo = init_repo(tmp_path / "repo")
    write_tree(
        repo,
        {"policies/groups/web.yaml": HARMLESS.format(name="web"), "policies/g.txt": "name: g\n"},
    )
    os.symlink(runner_files, repo / "policies" / "host")
    os.symlink("groups", repo / "policies" / "again")
    os.symlink("g.txt", repo / "policies" / "g.yml")
    head = commit_all(repo, "links")
    on_disk = read_folder(repo / "policies")
    assert on_disk == read_git(repo, head, "policies")
    assert [f.path for f in on_disk] == ["g.yml", "groups/web.yaml"]


def test_a_fifo_named_yaml_is_refused_without_blocking(tmp_path):
    """Only the disk can hold one; opening it must not wait for a writer."""
    tree = write_tree(tmp_path / "p", {"ok.yaml": HARMLESS.format(name="ok")})
    os.mkfifo(tree / "pipe.yaml")
    with pytest.raises(LoadErrors) as err:
        read_folder(tree)
    assert [(e.file, e.message) for e in err.value.errors] == [
        ("pipe.yaml", "not a regular file, a folder or a symlink")
    ]


_NAMES = ["a.yaml", "b.txt", "d", "e.yml", ".h", "x.yaml"]
_TARGET_PARTS = ["..", ".", "d", "a.yaml", "b.txt", ".h", "e.yml", "x.yaml", ""]


@st.composite
def trees(draw):  # type: ignore[no-untyped-def]
    """Small trees of files, folders and links, as a git checkout leaves them (no empty
    folders): folder names nest up to two deep, link texts mix names, `.`, `..` and `/`."""
    entries: dict[str, tuple[str, str]] = {}
    folders = ["", *draw(st.lists(st.sampled_from(["d", "d/d", ".h", "d/.h"]), max_size=3))]
    for folder in folders:
        for name in draw(st.lists(st.sampled_from(_NAMES), max_size=4, unique=True)):
            path = f"{folder}/{name}" if folder else name
            if any(path == f or f.startswith(path + "/") for f in folders):
                continue
            if draw(st.booleans()):
                entries[path] = ("file", f"kind: SecurityGroup\nname: {path}\n")
            else:
                parts = draw(st.lists(st.sampled_from(_TARGET_PARTS), min_size=1, max_size=4))
                entries[path] = ("link", "/".join(parts) or ".")
        entries.setdefault(f"{folder}/keep.txt" if folder else "keep.txt", ("file", ""))
    return entries


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_any_tree_reads_the_same_from_disk_and_from_git(tmp_path_factory, entries):
    """The property behind the attacks: whatever files, folders and links a pull request
    commits, the folder reader and the git reader return the same files with the same bytes,
    or refuse the same names with the same messages."""
    repo = init_repo(tmp_path_factory.mktemp("tree") / "repo")
    for path, (kind, content) in entries.items():
        full = repo / "policies" / path
        full.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            full.write_text(content)
        else:
            os.symlink(content, full)
    head = commit_all(repo, "tree")

    def outcome(read):  # type: ignore[no-untyped-def]
        try:
            return read(), []
        except LoadErrors as exc:
            return None, [(e.file, e.message) for e in exc.errors]

    disk = outcome(lambda: read_folder(repo / "policies"))
    git = outcome(lambda: read_git(repo, head, "policies"))
    assert disk == git


# --- 4. a quoted "<<" is an unknown field, as every other YAML tool reads it ----------------


def test_a_quoted_merge_key_is_an_unknown_field_not_an_allow_all_rule(tmp_path):
    """`{"<<": {destination: 0.0.0.0/0}, protocol: all}` was read as an allow-all rule; yq,
    PyYAML and editors see a rule with an unknown key and no destination."""
    repo = init_repo(tmp_path / "repo")
    write_tree(
        repo,
        {
            "policies/sg.yaml": """
                kind: SecurityGroup
                name: sneaky
                globally_enabled: {running: true}
                rules:
                  - {"<<": {destination: 0.0.0.0/0}, protocol: all}
            """
        },
    )
    head = commit_all(repo, "quoted merge key")
    for rev in ([], ["--rev", head]):
        result = cli(repo, "validate", "policies", *rev)
        assert result.exit_code == 1
        assert 'sg.yaml:5:5: SecurityGroup/sneaky: rules[0]: unknown field(s): ["<<"]' in (
            result.output
        )
        assert "rules[0].destination: nil destination" in result.output


@pytest.mark.parametrize("checkout", ["head", "base"])
def test_plan_refuses_a_head_whose_policy_folder_became_a_link(tmp_path, checkout):
    """Whatever the working tree holds (the PR's link, or the base's real folder), the plan
    reads the head from git and refuses it; nothing of the runner's files reaches the comment."""
    from reconciler.ci.plan import run_plan
    from reconciler.ci.report import render

    runner_files = outside_secrets(tmp_path)
    repo = policy_checkout(tmp_path)
    base = commit_all(repo, "base")
    shutil.rmtree(repo / "policies")
    os.symlink(runner_files, repo / "policies")
    head = commit_all(repo, "policies is now a link")
    if checkout == "base":
        git(repo, "checkout", "-q", base)
    report = run_plan(str(repo / "policies"), base, head, ["directory"])
    assert report.exit_code(True) == 1
    assert [f.message for f in report.head_findings] == [
        "the policy folder goes through a symlink (policies); it must be a folder of the "
        "repository, so nothing was read"
    ]
    for fmt in ("markdown", "text", "json"):
        assert SECRET not in render(report, fmt)


def test_a_link_to_another_repository_is_refused_but_an_operators_own_link_is_not(tmp_path):
    """`policies -> /elsewhere/repo` makes another repository look like the top; the
    enclosing repository tracks that link, so it is refused.  `~/src -> /data/src` under a
    dotfiles repository in `~` is not tracked there: the operator's own layout, read as is."""
    other = init_repo(tmp_path / "elsewhere" / "repo")
    write_tree(other, {"creds.yaml": f"{SECRET}: 1\n"})
    commit_all(other, "someone else's repository")
    repo = init_repo(tmp_path / "repo")
    os.symlink(other, repo / "policies")
    commit_all(repo, "policies is a link to another repository")
    result = load_folder(repo / "policies")
    assert [f.message for f in result.findings] == [
        "the policy folder goes through a symlink (policies); it must be a folder of the "
        "repository, so nothing was read"
    ]
    assert SECRET not in str(result.findings)
    assert not load_policy(repo / "policies", "HEAD").ok

    home = init_repo(tmp_path / "home")  # a dotfiles repository
    data = policy_checkout(tmp_path / "data")
    os.symlink(data.parent, home / "src")
    through_own_link = home / "src" / "repo" / "policies"
    assert load_folder(through_own_link) == load_folder(data / "policies")
    assert load_policy(through_own_link, "HEAD") == load_folder(data / "policies")
    assert load_folder(data / "policies").ok


def test_revisions_loaded_through_one_parse_cache_read_as_each_alone(tmp_path):
    """`asgctl plan` loads several revisions of one repository through one ParseCache: each
    must come out exactly as loaded alone, schema findings and warnings with their own
    file:line included, and validating one must not change what the next one reads."""
    repo = init_repo(tmp_path / "repo")
    shared = {
        "policies/web.yaml": """
            kind: SecurityGroup
            name: web
            rules:
              - {protocol: tcp, destination: 10.0.0.0/24, ports: "443"}
              - {protocol: tcp, destination: 10.0.0.5, ports: "443"}
            globally_enabled: {running: true}
            """,
        "policies/broken.yaml": """
            kind: SecurityGroup
            name: broken
            colour: blue
            rules: []
            """,
    }
    write_tree(repo, {**shared, "policies/db.yaml": "kind: SecurityGroup\nname: db\nrules: []\n"})
    first = commit_all(repo, "first")
    write_tree(repo, {"policies/db.yaml": "kind: SecurityGroup\nname: db\nrulez: []\n"})
    second = commit_all(repo, "second")
    alone = [load_revision(repo, rev, "policies") for rev in (first, second, first)]
    cache = ParseCache()
    together = [load_revision(repo, rev, "policies", cache=cache) for rev in (first, second, first)]
    assert together == alone
    assert all(not r.ok for r in alone)  # broken.yaml's unknown field, in every revision
    assert any(f.severity == "warning" and "redundant" in f.message for f in alone[0].findings)
    assert {(f.file, f.line) for f in together[1].findings if "colour" in f.message} == {
        ("broken.yaml", 1)  # an unexpected field is reported at its mapping
    }
    assert any("rulez" in f.message for f in together[1].findings)
    # A budget too small for two revisions' files is still too small with the cache.
    limits = Limits(max_load_nodes=20)
    assert load_revision(repo, first, "policies", limits) == load_revision(
        repo, first, "policies", limits, cache
    )
