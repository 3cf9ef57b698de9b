"""Host names as grants by name take them: what is valid, and the one normalised form.

Pure, and the one validator of names: a Destination's `fqdns` (validation), an endpoint
asked about by name (`explain --to NAME:PORT`, policy tests) and the agent's DNS client all
agree on it.
"""

from __future__ import annotations

import ipaddress
import re

MAX_FQDN_LENGTH = 253
"""RFC 1035 2.3.4: 255 octets on the wire, so 253 characters written without the root dot."""
MAX_LABEL_LENGTH = 63
MSG_FQDNS_ENTRY = "fqdns entries must be strings"
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


def _show(value: object, limit: int = 64) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_ip_literal(name: str) -> bool:
    for parse in (ipaddress.ip_address, lambda t: ipaddress.ip_network(t, strict=False)):
        try:
            parse(name)
        except ValueError:
            continue
        return True
    return False


def fqdn_problem(name: str) -> str | None:
    """Why `name` (already lower-cased, no trailing dot) is not a name we enforce, or None.

    RFC 1123 2.1 host names: labels of letters, digits and inner hyphens, 1-63 characters,
    253 in all, and a top-level label that is not all digits (so no address in disguise).
    A wildcard is `*` as the whole left-most label, over at least two more labels: `*.com`
    would grant a whole top-level domain."""
    if not name:
        return "must not be empty"
    if any(c.isspace() for c in name):
        return "must not contain whitespace"
    if _is_ip_literal(name):
        return "is an IP address or CIDR: give it under ips"
    if name == "*":
        return "a bare * would allow every name: give a domain after it (*.example.com)"
    labels = name.split(".")
    wildcard = labels[0] == "*"
    rest = labels[1:] if wildcard else labels
    if any("*" in label for label in rest) or ("*" in labels[0] and not wildcard):
        return "* may only be the whole left-most label (*.example.com)"
    if len(name) > MAX_FQDN_LENGTH:
        return f"must be at most {MAX_FQDN_LENGTH} characters"
    for label in rest:
        if not label:
            return "must not contain empty labels"
        if len(label) > MAX_LABEL_LENGTH:
            return f"labels must be at most {MAX_LABEL_LENGTH} characters"
        if not _LABEL_RE.fullmatch(label):
            return (
                "labels must be letters, digits and hyphens, not starting or ending with "
                "a hyphen (RFC 1123)"
            )
    if len(rest) < 2:
        if wildcard:
            return "a wildcard needs at least two labels after * (*.example.com)"
        return "must be a fully qualified name with at least two labels (db.example.com)"
    if rest[-1].isdigit():
        return "the top-level label must not be all digits"
    return None


def normalise_fqdn(text: str) -> str:
    """The form names are compared and enforced in: lower case, without the root dot."""
    lowered = text.lower()
    return lowered[:-1] if lowered.endswith(".") and not lowered.endswith("..") else lowered


def fqdn_entry(entry: object) -> tuple[str | None, str | None]:
    """One name as written: its normalised form, or the message saying why it is not one."""
    if not isinstance(entry, str):
        return None, f"{MSG_FQDNS_ENTRY}, got {_show(entry)}"
    name = normalise_fqdn(entry)
    problem = fqdn_problem(name)
    if problem is not None:
        return None, f"invalid fqdn '{_show(entry)}', {problem}"
    return name, None
