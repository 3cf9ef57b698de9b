"""Destinations by DNS name: resolving names at the cell, learning them from the answers
containers receive, and keeping their kernel sets.

`dns` is our own small DNS client (UDP, TCP on truncation), `kernelsets` the writers of the
per-name sets (ipset, nft), `keeper` the pure refresh schedule and bounds, `service` the
agent's I/O around them.  The interception: `hold` its kernel rules, `nfqueue` the queue
reader, `answers` its pure decisions, `netlinksets` the kept-open set writes, `intercept`
its thread; `agent` ties both to the agent.  docs/fqdn.md is the design.
"""
