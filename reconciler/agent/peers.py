"""The other cells' status branches, read by an agent whose head waits for earlier waves.

Only when a valid head is pending and some wave comes before this cell
(`reconciler.agent.rollout.wants_fleet`) does the agent look at the others: it lists
`refs/heads/<status-prefix>*` on its source (`git ls-remote`), refuses more than
`MAX_PEERS` of them, and fetches exactly those refs, one commit deep, into a bare cache of
its own (`<state-dir>/peers.git`) -- never the policy branch, tags or anything else.  Each
`status.yaml` is then read as every fleet reader reads it (`reconciler.status.read`: the
blob's size asked of git first, the safe loader with budgets, the status schema), so a
hostile branch costs only its own cell a `CellReport.error`, which its wave reads as not
Ready.  A fetch that fails is `FleetReports.error`: the waves hold, they never guess.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reconciler.agent.config import redact_url
from reconciler.agent.rollout import CellReport, FleetReports
from reconciler.agent.source import clip
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.status.branch import CELL_NAME, blob_spec
from reconciler.status.document import parse_status
from reconciler.status.read import read_status_blobs

MAX_PEERS = 20_000
"""Status branches an agent reads at most: more is not a fleet, it is someone pushing refs."""
_REMOTE = "refs/remotes/origin/"


class PeerReader:
    """Reads `<prefix><cell>` branches of `url` into `cache_dir` (a bare repository)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        cache_dir: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.path = Path(cache_dir)
        self.timeout = timeout
        self.max_peers = max_peers

    def _git(self, *args: str) -> gitio.Result:
        return gitio.run(self.path, *args, timeout=self.timeout)

    def _open(self) -> None:
        if (self.path / "HEAD").exists():
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        for args in (("init", "--quiet", "--bare"), ("config", "gc.auto", "0")):
            res = self._git(*args)
            if res.returncode != 0:
                raise OSError(res.stderr.strip() or f"git {args[0]} failed")

    def read(self) -> FleetReports:
        """Every status branch's report; FleetReports.error when they cannot be fetched."""
        try:
            return self._read()
        except (OSError, gitio.GitTimeout, InventoryError) as exc:
            return FleetReports(error=self._said(str(exc), "git failed"))

    def _read(self) -> FleetReports:
        self._open()
        heads = f"refs/heads/{self.prefix}"
        listing = self._git("ls-remote", "--refs", "--", self.url, f"{heads}*")
        if listing.returncode != 0:
            return FleetReports(error=self._said(listing.stderr, "git ls-remote failed"))
        refs = [
            line.split("\t", 1)[1]
            for line in listing.stdout.splitlines()
            if "\t" in line and line.split("\t", 1)[1].startswith(heads)
        ]
        if len(refs) > self.max_peers:
            return FleetReports(
                error=f"{len(refs)} status branches, over the limit of {self.max_peers}"
            )
        cells: dict[str, str] = {}
        reports: list[CellReport] = []
        for ref in sorted(refs):
            cell = ref[len(heads) :]
            if CELL_NAME.match(cell):
                cells[cell] = f"{_REMOTE}{self.prefix}{cell}"
            # A branch whose name is no cell name is nobody's wave: not looked at.
        if cells:
            res = self._git(
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--no-auto-gc",
                "--depth=1",
                "--",
                self.url,
                f"+{heads}*:{_REMOTE}{self.prefix}*",
            )
            if res.returncode != 0:
                return FleetReports(error=self._said(res.stderr, "git fetch failed"))
            blobs = read_status_blobs(self.path, [blob_spec(ref) for ref in cells.values()])
            for (cell, ref), data in zip(cells.items(), blobs, strict=True):
                try:
                    if isinstance(data, InventoryError):
                        raise data
                    header = parse_status(data, blob_spec(ref)).header
                    reports.append(CellReport.from_header(cell, header))
                except InventoryError as exc:
                    reports.append(CellReport(cell, error=clip(str(exc), 300)))
        self._prune(set(cells.values()))
        return FleetReports(tuple(reports))

    def _said(self, stderr: str, default: str) -> str:
        """git's last words, cut, with the URL's credentials hidden (statuses are public)."""
        lines = [x.strip() for x in stderr.splitlines() if x.strip()]
        text = " / ".join(lines[-2:]) or default
        return clip(text.replace(self.url, redact_url(self.url)), 300)

    def _prune(self, keep: set[str]) -> None:
        """Forget branches that are gone, so their objects can be collected."""
        res = self._git("for-each-ref", "--format=%(refname)", "--", f"{_REMOTE}{self.prefix}")
        for ref in res.stdout.split():
            if ref not in keep:
                self._git("update-ref", "-d", ref)
