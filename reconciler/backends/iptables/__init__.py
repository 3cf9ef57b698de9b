"""The iptables backends: chains in the filter table, hooked into FORWARD.

`render` writes a plan as `iptables-restore` text in `iptables-save`'s canonical form,
`parse` reads `iptables-save` back, `delta` builds the minimal `--noflush` transaction,
`memory` is what a backend may remember of the kernel between reads; `backend` drives the
iptables-save/-restore tools, `libiptc` the same tables through the library in-process.
`cflayout` renders Cloud Foundry's own per-container layout (benchmarks and the lab).
"""
