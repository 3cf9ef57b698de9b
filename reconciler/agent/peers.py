"""The other cells' status branches, read by an agent whose head waits for earlier waves.

Only when a valid head is pending and some wave comes before this cell
(`reconciler.agent.rollout.wants_fleet`) does the agent look at the others, through the one
status reader (`reconciler.status.fetch`): every status repository of the fleet (the
policy repository, or the `status-url` shards), one batched fetch each into a bare cache of
its own (`<state-dir>/peers.git`) -- the status branches only, one commit deep, never the
policy branch or tags -- within a budget (`ReadBudget`: branches over all shards, bytes
per file and in all).  Each `status.yaml` header is parsed once per blob (kept in memory
between reads), held to the status schema; a hostile branch costs only its own cell a
`CellReport.error`, which its wave reads as not Ready, and a branch in a shard its cell does
not hash to is not read at all.  A fetch that fails, or more branches than the budget, is
`FleetReports.error`: the waves hold, they never guess.
"""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.agent.rollout import CellReport, FleetReports
from reconciler.agent.source import clip
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.status.fetch import (
    DEFAULT_BUDGET,
    FetchError,
    ParsedStore,
    ReadBudget,
    StatusRepos,
    read_remote,
    status_cache,
)
from reconciler.status.read import HEADER


class PeerReader:
    """Reads every cell's status branch of `repos` into `cache_dir` (a bare repository)."""

    def __init__(
        self,
        repos: StatusRepos,
        cache_dir: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        budget: ReadBudget = DEFAULT_BUDGET,
    ) -> None:
        self.repos = repos
        self.path = Path(cache_dir)
        self.timeout = timeout
        self.budget = budget
        self.store = ParsedStore()
        """Headers by blob id, for this process's life: an unchanged peer is not re-parsed."""

    def read(self) -> FleetReports:
        """Every status branch's report; FleetReports.error when they cannot be fetched."""
        try:
            with status_cache(self.path) as repo:
                batch = read_remote(
                    repo,
                    self.repos,
                    HEADER,
                    budget=self.budget,
                    store=self.store,
                    timeout=self.timeout,
                )
        except (FetchError, OSError, gitio.GitTimeout, InventoryError) as exc:
            return FleetReports(error=clip(self._hidden(str(exc)) or "git failed", 300))
        reports = [
            CellReport(c.cell, error=clip(c.error, 300))
            if c.error
            else CellReport.from_header(c.cell, c.value)
            for c in batch.cells
        ]
        return FleetReports(tuple(reports))

    def _hidden(self, text: str) -> str:
        """The message with every shard URL's credentials hidden (statuses are public)."""
        for url in self.repos.urls():
            text = gitio.redacted(text, url)
        return text
