"""Flow records: what the kernel logged about containers' egress, mapped back to the plan.

`record` defines the kernel prefix scheme and the record format; `nflog` reads NFLOG from
netlink; `collect` aggregates packets into records on the agent; `read` is `asgctl flows`.
"""
