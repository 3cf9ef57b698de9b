"""The interception's kernel rules: copy queries to trusted resolvers, hold their answers.

Two chains of ours in the `mangle` table of each family, written with the iptables tooling
of the backend's variant (legacy for the legacy and libiptc backends; iptables-nft for the
nft variant and for the nftables backend, whose own `queue` statement this kernel refuses:
the xt NFQUEUE target through nft's compat layer is the only queue it offers):

    -A PREROUTING  -m comment --comment "asg:dnsl" -j ASG-DNSL
    -A ASG-DNSL    -d <resolver> -p udp|tcp --dport 53 -j NFLOG --nflog-group Q --nflog-size 512
    -A POSTROUTING -m comment --comment "asg:dnsq" -j ASG-DNSQ
    -A ASG-DNSQ    -s <resolver> -p udp|tcp --sport 53 -m addrtype ! --dst-type LOCAL
                   -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j NFQUEUE --queue-num Q

* Queries are copied in PREROUTING (before any DNAT: the resolver a container asked), held
  answers in POSTROUTING (forwarded answers and a cell-local resolver's alike).
* No `--queue-bypass`: with nobody reading (agent down) or the queue full (agent stuck),
  the kernel drops the answer; the container's stub asks again.  Fail closed.
* Only answers from trusted resolvers, in the reply direction of a flow a query opened, are
  held: a container allowed to reach another DNS server cannot teach us its addresses.
* Never an answer to the cell itself (`! --dst-type LOCAL`): a cell-local resolver's answers
  to the host's own processes (bosh-dns, the agent's own resolution) pass POSTROUTING too,
  and must not wait for, or be dropped without, an agent.
* The jumps go first in their hooks (`-I ... 1`): an ACCEPT of the host's own earlier in
  mangle would end the table's traversal before our chains see the packet.
* Ownership: each chain's first rule is the ownership marker the iptables backend uses
  (`render.marker_rule`); a chain of these names without it is someone else's, and we
  refuse to write or remove it.  The jumps carry their own comments; removing deletes only
  the exact rules we wrote.  Nothing else in the table is read or written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.backends.errors import DataplaneError
from reconciler.backends.iptables.render import marker_rule
from reconciler.backends.kernel.runner import Runner

ANSWER_CHAIN = "ASG-DNSQ"
QUERY_CHAIN = "ASG-DNSL"
JUMPS = (
    ("POSTROUTING", ANSWER_CHAIN, "asg:dnsq"),
    ("PREROUTING", QUERY_CHAIN, "asg:dnsl"),
)
QUERY_COPY = 512
"""Bytes of a query copied to us: an IPv6 header, a TCP header with options, the DNS
header and a 255-octet question fit."""


def variant_for(backend: str, variant: str) -> str:
    """Which iptables tooling holds the interception for a backend (see the module doc)."""
    if backend in ("nftables", "nft"):
        return "nft"
    if backend == "libiptc":
        return "legacy"
    if variant not in ("legacy", "nft"):
        raise DataplaneError(f"unknown iptables variant {variant!r} for the DNS hold")
    return variant


def _tool(variant: str, family: int, kind: str) -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}-{kind}"


def _jump(hook: str, chain: str, comment: str) -> str:
    return f'-A {hook} -m comment --comment "{comment}" -j {chain}'


def render(family: int, resolvers: Sequence[tuple[str, int]], queue: int) -> str:
    """iptables-restore input (`--noflush`) for our two chains of one family: declaring
    them empties them, then they are filled.  Resolvers are re-printed from parsed
    addresses and integers only."""
    host = 32 if family == 4 else 128
    lines = ["*mangle", f":{ANSWER_CHAIN} - [0:0]", f":{QUERY_CHAIN} - [0:0]"]
    lines += [marker_rule(ANSWER_CHAIN), marker_rule(QUERY_CHAIN)]
    for address, port in resolvers:
        ip = ipaddress.ip_address(address)
        if ip.version != family:
            continue
        for proto in ("udp", "tcp"):
            lines.append(
                f"-A {QUERY_CHAIN} -d {ip}/{host} -p {proto} -m {proto} --dport {int(port)} "
                f"-j NFLOG --nflog-group {int(queue)} --nflog-size {QUERY_COPY}"
            )
            lines.append(
                f"-A {ANSWER_CHAIN} -s {ip}/{host} -p {proto} -m {proto} --sport {int(port)} "
                "-m addrtype ! --dst-type LOCAL -m conntrack --ctstate ESTABLISHED --ctdir REPLY "
                f"-j NFQUEUE --queue-num {int(queue)}"
            )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DnsHold:
    """The interception's rules in one namespace, with one variant's tooling."""

    runner: Runner
    variant: str
    queue: int

    def _save(self, family: int, *, counters: bool = False) -> list[str] | None:
        """The `mangle` table's lines ([] when the table does not exist); None when the
        tool fails.  A full save, not `-t mangle`: it lists only tables that exist, so
        reading loads no module and creates no table (as `backend.probe_variant` reads)."""
        argv = [_tool(self.variant, family, "save"), *(["-c"] if counters else [])]
        res = self.runner.run(argv)
        if res.returncode != 0:
            return None
        lines = res.stdout.splitlines()
        if "*mangle" not in lines:
            return []
        table = lines[lines.index("*mangle") + 1 :]
        return table[: table.index("COMMIT")] if "COMMIT" in table else table

    def _ours(self, lines: list[str], chain: str) -> bool | None:
        """None: no such chain; True: ours (marker first, or flushed empty while our own
        commented jump still leads to it); False: someone else's."""
        if not any(line.startswith(f":{chain} ") for line in lines):
            return None
        rules = [line for line in lines if line.startswith(f"-A {chain} ")]
        if not rules:
            return any(_jump(*j) in lines for j in JUMPS if j[1] == chain)
        return rules[0] == marker_rule(chain)

    def install(self, resolvers: Sequence[tuple[str, int]], *, repair: bool = False) -> bool:
        """Write (or rewrite) our chains and add the jumps that are missing; whether
        anything was written.  `repair` (every agent cycle): write only a family whose
        chains or jumps are not as rendered (flushed, deleted, edited by someone)."""
        wrote = False
        for family in (4, 6):
            lines = self._save(family)
            if lines is None:
                if family == 6:
                    continue  # no IPv6 tables here: nothing of IPv6 to hold
                raise DataplaneError(
                    f"{_tool(self.variant, 4, 'save')} failed: cannot write the DNS hold"
                )
            for _, chain, _ in JUMPS:
                if self._ours(lines, chain) is False:
                    raise DataplaneError(
                        f"mangle chain {chain} exists and is not ours (no ownership marker); "
                        "refusing to write the DNS hold"
                    )
            text = render(family, resolvers, self.queue).removesuffix("\n")
            want = [line for line in text.splitlines() if line.startswith("-A ")]
            have = [line for line in lines if line.startswith(("-A ASG-DNSQ ", "-A ASG-DNSL "))]
            jumped = all(_jump(*j) in lines for j in JUMPS)
            if repair and jumped and sorted(want) == sorted(have):
                continue
            # First in the hook: a host's own ACCEPT in mangle would otherwise end the
            # table's traversal before our chains see the packet.
            jumps = [
                _jump(*j).replace(f"-A {j[0]} ", f"-I {j[0]} 1 ", 1)
                for j in JUMPS
                if _jump(*j) not in lines
            ]
            text = "\n".join([text, *jumps, "COMMIT"]) + "\n"
            res = self.runner.run([_tool(self.variant, family, "restore"), "--noflush"], stdin=text)
            if res.returncode != 0:
                raise DataplaneError(f"the DNS hold was refused: {res.stderr.strip()}")
            wrote = True
        return wrote

    def remove(self) -> bool:
        """Delete our jumps and chains (only if ours); nothing else is touched.  Whether
        anything was there to delete."""
        removed = False
        for family in (4, 6):
            lines = self._save(family)
            if lines is None:
                continue
            out = ["*mangle"]
            for hook, chain, comment in JUMPS:
                if self._ours(lines, chain) is not True:
                    continue
                jump = _jump(hook, chain, comment)
                out += ["-D" + jump[2:]] * lines.count(jump)
                out += [f"-F {chain}", f"-X {chain}"]
            if len(out) == 1:
                continue
            text = "\n".join([*out, "COMMIT"]) + "\n"
            res = self.runner.run([_tool(self.variant, family, "restore"), "--noflush"], stdin=text)
            if res.returncode != 0:
                raise DataplaneError(f"the DNS hold could not be removed: {res.stderr.strip()}")
            removed = True
        return removed

    def held(self) -> int:
        """Packets our NFQUEUE rules have sent to the queue (both families): with the
        verdicts given, what was dropped while nobody read (agent down) is the difference."""
        total = 0
        for family in (4, 6):
            for line in self._save(family, counters=True) or []:
                if line.startswith("[") and f"-A {ANSWER_CHAIN} " in line and "NFQUEUE" in line:
                    total += int(line[1:].split(":", 1)[0])
        return total
