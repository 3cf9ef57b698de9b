"""The status-branch contract: how a cell tells the world what it enforces, in git.

One package holds the whole contract, so the agent that writes it and every reader (`asgctl
plan --inventory status`, `asgctl status`, the lab) cannot drift apart:

* `branch`: names.  Each cell's agent force-pushes `refs/heads/status/<cell>` (the prefix is
  the agent's `status-branch-prefix`); a reader finds them as `refs/heads/status/<cell>` or
  `refs/remotes/<remote>/status/<cell>`, the cell name being everything after `status/`,
  which must match `[A-Za-z0-9][A-Za-z0-9_.-]*`.  When a cell has several refs, the first of
  `refs/remotes/origin/...`, other remotes (sorted), then `refs/heads/...` wins: remotes are
  what the agents pushed; a local branch may be stale.
* The tip commit holds one YAML file, `status.yaml`, at the root of its tree
  (`branch.STATUS_FILE`); the agent writes it as a new root commit each time
  (`write.StatusWriter`), so the branch is always one commit deep.
* `document`: what the file says, held to `schemas/cell-status.schema.json`.  Its top-level
  `containers:` is a list of mappings with the keys `handle`, `ip`, `app_id`, `space_id`,
  `org_id` and `workload` (`app`, `task` or `staging`), the fields of CF's metadata store;
  any other keys (groups, chains, ...) are the agent's report and ignored by the inventory.
  An empty or missing list means the cell runs no container.  Entries are held to exactly
  the rules of `inventory.parse_store` (safe handles and GUIDs, valid and unique IPs), so a
  status branch cannot smuggle into a PR comment what a store file cannot.
* `read`: whoever can push a status branch is untrusted, so blobs are sized by git before
  they are read, parsed by the safe YAML loader with budgets, and a branch that breaks any
  rule is skipped with a message naming it and the field, never failing the other cells.
* `fetch`: the one reader every fleet reader goes through (`asgctl status`, `plan
  --inventory status`, `asgctl notify`, the waves): the policy repository's status branches
  or the agents' `status-url` shards (`branch.shard_of`: SHA-256 of the cell name, first 8
  bytes big-endian, modulo the shard count), one fetch per repository into an incremental
  cache, a branch in another cell's shard ignored, a branch and byte budget per read, each
  file parsed once per blob id.
* `write`: the document's text (`dump_status`, the block style the reader's fast path
  proves equal to a full YAML load) and the commit and push (`StatusWriter`).
"""
