"""Destinations by DNS name: resolving names at the cell and keeping their kernel sets.

`dns` is our own small DNS client (UDP, TCP on truncation), `resolver` the cell's
resolvers, `kernelsets` the writers of the per-name sets (ipset, nft), `keeper` the pure
refresh schedule and bounds, `service` the agent's I/O around them.  docs/fqdn.md is the
design, including what is not enforced yet (answer interception).
"""
