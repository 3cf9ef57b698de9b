"""The cell agent: pull the policy branch on a timer, converge the kernel, report back in git.

One cycle: fetch the branch into a local cache (`source`), check the head commit's signature
and ancestry (`verify`), load and validate the policy at that commit without a checkout,
compile the cell's plan for the containers in the metadata store, converge the dataplane,
then write `status.yaml` to the cell's own `status/<cell>` branch (`status`) and update the
metrics (`metrics`).  `loop` runs cycles on a jittered timer, on container changes and on
SIGHUP.

Every decision a cycle makes (apply or refuse a revision, which conditions hold, what the
status document says, which containers changed) is a pure function in `core` and `status`
of values the edges produced, so the policies that keep a fleet safe -- never apply an
unverified, rewound, invalid or mass-revoking head -- are tested without git or a kernel.
"""
