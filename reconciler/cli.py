"""The asgctl command line: a thin click layer over the reconciler API."""

import click


@click.group()
@click.version_option(package_name="asgctl")
def main() -> None:
    """GitOps reconciler for Cloud Foundry-style egress firewalls."""
