"""The git adapter (`reconciler.sources.gitio`): every product git call goes through it.

Real git, real repositories: the adapter's tree parser must list exactly what `git ls-tree`
lists, its `cat-file` process must end when the reader does, blob sizes must be asked before
any blob is read, a revision from a command line must never become an option of git's, and a
git that does not answer must come back as the caller's own error.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from reconciler.sources import gitio
from tests.policyrepo import commit_all, git, init_repo, write_tree


def _repo(tmp_path: Path) -> tuple[Path, str]:
    """A work tree whose head holds a file, an executable, a symlink, a folder, a name that is
    not UTF-8 and a submodule entry: every kind of tree entry."""
    repo = init_repo(tmp_path / "repo")
    write_tree(repo, {"a.yaml": "a: 1\n", "d/b.yaml": "b: 2\n"})
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    os.symlink("a.yaml", repo / "link.yaml")
    with open(os.path.join(os.fsencode(repo), b"caf\xe9.yaml"), "wb") as f:
        f.write(b"c: 3\n")
    git(repo, "add", "-A")
    sub = "1" * 40
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sub},vendor")
    git(repo, "commit", "-q", "-m", "every kind of entry")
    return repo, git(repo, "rev-parse", "HEAD")


def _ls_tree(repo: Path, tree: str) -> list[tuple[str, int, str]]:
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "-z", tree], capture_output=True, check=True
    ).stdout
    rows = []
    for record in out.split(b"\0"):
        if record:
            meta, name = record.split(b"\t", 1)
            mode, _type, oid = meta.split()
            rows.append((name.decode("utf-8", "surrogateescape"), int(mode, 8), oid.decode()))
    return rows


def test_the_tree_parser_lists_what_git_ls_tree_lists(tmp_path: Path) -> None:
    repo, head = _repo(tmp_path)
    with gitio.BlobReader(repo / ".git") as reader:
        root = reader.info(f"{head}^{{tree}}")
        assert root is not None and root.type == "tree"
        entries = reader.tree(root.oid)
    assert [(e.name, e.mode, e.oid) for e in entries] == _ls_tree(repo, head)
    kinds = {e.name: e.type for e in entries}
    assert kinds["d"] == "tree" and kinds["vendor"] == "commit" and kinds["link.yaml"] == "blob"
    assert "caf\udce9.yaml" in kinds  # the raw byte survives, as the file system holds it


def test_the_reader_ends_its_cat_file_processes(tmp_path: Path) -> None:
    """gitpython's Repo kept `cat-file` children alive per object; the adapter's reader owns
    its two and ends them when it is closed."""
    repo, head = _repo(tmp_path)
    with gitio.BlobReader(repo / ".git") as reader:
        info = reader.info(f"{head}:a.yaml")
        assert info is not None and reader.read(info.oid) == b"a: 1\n"
        assert reader.info(f"{head}:nothing.yaml") is None
        assert reader.read(info.oid) == b"a: 1\n"  # the same processes, still in step
        procs = list(reader._procs.values())
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)  # exited and reaped
    assert reader._procs == {}


def test_sizes_are_asked_before_any_blob_is_read(tmp_path: Path) -> None:
    repo, _head = _repo(tmp_path)
    (repo / "big.yaml").write_bytes(b"x" * 5000)
    commit_all(repo, "big")
    names = ["HEAD:a.yaml", "HEAD:big.yaml", "HEAD:missing.yaml", "HEAD:d", "HEAD:d/b.yaml"]
    got = gitio.read_blobs(repo, names, limit=1000)
    assert got == [
        b"a: 1\n",
        "5000 bytes, over the limit of 1000 bytes",
        "no such file",
        "no such file",  # a folder is not a file
        b"b: 2\n",
    ]


def test_a_revision_never_becomes_an_option(tmp_path: Path) -> None:
    """A `--base`/`--head` value such as `--output=FILE` is a revision name to git, which
    names nothing, rather than an option that writes a file."""
    repo, head = _repo(tmp_path)
    target = tmp_path / "written"
    assert gitio.resolve_commit(repo, f"--output={target}") is None
    assert not target.exists()
    assert gitio.resolve_commit(repo, "HEAD") == head
    assert gitio.resolve_commit(repo / "d", "main") == head  # from a folder of the work tree
    assert gitio.resolve_commit(tmp_path, "HEAD") is None  # not a repository


def test_a_git_that_does_not_answer_is_the_callers_error(tmp_path: Path) -> None:
    """A real git that hangs (an alias running `sleep`) is killed at the timeout and
    reported as the caller's exception, naming the command."""

    class Stuck(Exception):
        pass

    with pytest.raises(Stuck, match=r"git slow: no answer within 0\.3 s"):
        gitio.run_git(None, "-c", "alias.slow=!sleep 2", "slow", timeout=0.3, error=Stuck)


def test_a_failing_git_names_its_command_and_its_words(tmp_path: Path) -> None:
    class Failed(Exception):
        pass

    with pytest.raises(Failed, match=r"git rev-parse: fatal: not a git repository"):
        gitio.run_git(tmp_path / "nowhere", "rev-parse", "HEAD", timeout=30, error=Failed)


def test_git_never_reads_the_operators_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's `~/.gitconfig` (here an alias that would run a command) is not read."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[alias]\n\tboom = !touch " + str(tmp_path / "ran") + "\n")
    monkeypatch.setenv("HOME", str(home))
    res = gitio.run(None, "boom", timeout=30)
    assert res.returncode != 0 and not (tmp_path / "ran").exists()


def _git_children() -> list[int]:
    """Our own child processes that are git (a leaked `cat-file` would be one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, rest = stat.split(") ", 1)[0].split("(", 1)[1], stat.rsplit(") ", 1)[1]
            if name == "git" and int(rest.split()[1]) == os.getpid():
                found.append(int(entry))
    return found


def test_reading_policy_from_git_leaves_no_git_process_behind(tmp_path: Path) -> None:
    """The policy reader walks trees through the adapter's reader, which it closes: however
    many revisions are read (an agent reads one per change, for months), no git child stays."""
    from reconciler.policy.source import read_git

    repo, head = _repo(tmp_path)
    before = _git_children()
    for _ in range(5):
        assert [f.path for f in read_git(repo, head, "d")] == ["b.yaml"]
    assert _git_children() == before == []
