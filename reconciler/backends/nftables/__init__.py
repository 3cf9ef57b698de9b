"""The nftables backend: one `inet asgctl` table, verdict-map dispatch and shared sets.

`render` writes a plan as the table's objects in `nft -j`'s canonical JSON, `parse` reads
a listing back, `delta` builds the minimal `nft -j -f -` transaction, `backend` drives `nft`
and remembers what it may of the kernel between reads.
"""
