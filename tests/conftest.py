"""Shared test helpers: the network-namespace lab for end-to-end tests.

`require_netns()` skips a test on hosts that cannot create namespaces, except under CI=true,
where it fails: CI runs as root, so a skip there would mean the end-to-end tests silently
stopped running.  `make_lab` builds labs that are always torn down after the test, however it
ends; `lab` is a small standard cell for tests that need nothing special.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import pytest

from asgctl_lab.netns import (
    ContainerSpec,
    Lab,
    ServiceSpec,
    cleanup_stale,
    netns_unavailable_reason,
)

# The standard cell: a dual-stack app and a staging container of the same app; an echo
# service (dual-stack) and a second, unrelated one.
STANDARD_CONTAINERS = (
    ContainerSpec(
        "web",
        app_id="app-web",
        space_id="space-prod",
        org_id="org-acme",
        policy_group_id="pg-web",
        ipv6=True,
    ),
    ContainerSpec(
        "stager", app_id="app-web", space_id="space-prod", org_id="org-acme", workload="staging"
    ),
)
STANDARD_SERVICES = (
    ServiceSpec("echo", tcp_ports=(80, 8080), udp_ports=(53,), ipv6=True),
    ServiceSpec("other", tcp_ports=(443,)),
)


def skip_unless_available(what: str, reason: str | None) -> None:
    """Nothing when `reason` is None; else skip (`what` unavailable: reason), or fail under
    CI=true, where a skip would mean the tests needing `what` silently stopped running."""
    if not reason:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true, but the {what} cannot run here: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


def require_netns() -> None:
    """Skip unless this host can run a lab (root, `ip`, namespaces); fail instead under CI."""
    skip_unless_available("netns lab", netns_unavailable_reason())


def _libiptc_unavailable() -> str | None:
    try:
        import iptc  # type: ignore[import-not-found, import-untyped]  # noqa: F401 - untyped C binding
    except (ImportError, OSError) as e:
        return f"python-iptables does not load ({e}); pip install -e '.[libiptc]'"
    return None


def tool_unavailable_reason(tool: str) -> str | None:
    """Why `tool` (a program on PATH, or "libiptc") cannot be used here; None when it can."""
    if tool == "libiptc":
        return _libiptc_unavailable()
    return None if shutil.which(tool) else f"`{tool}` is not on PATH (make sysdeps installs it)"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.requires("ssh-keygen", ...)`: skip without the tools, fail under CI."""
    for mark in item.iter_markers("requires"):
        for tool in mark.args:
            skip_unless_available(tool, tool_unavailable_reason(tool))


@pytest.fixture(scope="session")
def _stale_labs_reaped() -> None:
    """Once per session: remove labs left by crashed runs (never those of a live process)."""
    require_netns()
    cleanup_stale()


@pytest.fixture
def make_lab(_stale_labs_reaped: None) -> Iterator[Callable[..., Lab]]:
    """`make_lab(containers, services, **kwargs)` -> a started Lab, torn down after the test."""
    with ExitStack() as stack:

        def make(
            containers: Sequence[ContainerSpec] = (),
            services: Sequence[ServiceSpec] = (),
            **kwargs: Any,
        ) -> Lab:
            return stack.enter_context(Lab(containers, services, **kwargs))

        yield make


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    """The standard cell (STANDARD_CONTAINERS, STANDARD_SERVICES), started."""
    return make_lab(STANDARD_CONTAINERS, STANDARD_SERVICES)
