"""`asgctl notify`: status-branch changes told to people, as GitHub commit statuses and webhooks.

* `events`: what one cell's status says, as a notice (pure): the revision it is about (a
  40-hex SHA-1 only), success / failure / pending, the reason and message escaped and cut.
* `http`: one POST with GitHub's retry rules (5xx and rate limits back off, `Retry-After`
  honoured; 401/403/404 stop the run with a clear message; redirects are never followed).
* `github`, `webhook`: the two sinks.
* `run`: fetch every status branch, send what changed since the state file, remember it.

Whoever can push a status branch is untrusted: nothing from a status file chooses where a
notice goes (the repository, the API and the webhook URL are the operator's), a revision
that is not `<branch>@sha1:<40 hex>` is never posted, and every string is escaped and cut
before it leaves.
"""
