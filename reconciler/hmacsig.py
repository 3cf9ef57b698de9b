"""HMAC-SHA256 request signatures, GitHub's way: a header `sha256=<hex of HMAC(secret, body)>`.

One spelling for both directions: `asgctl notify` signs the webhooks it sends
(`X-Asgctl-Signature-256`), and the agent's push receiver (`asgctl agent --listen-webhook`)
checks GitHub's `X-Hub-Signature-256` and the same generic header.  The check compares in
constant time (`hmac.compare_digest`), so a caller cannot learn the expected signature one
byte at a time from how long a refusal takes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

PREFIX = "sha256="
SIGNATURE_HEADER = "X-Asgctl-Signature-256"
"""The header asgctl signs its own webhooks with (and accepts, besides GitHub's)."""
GITHUB_SIGNATURE_HEADER = "X-Hub-Signature-256"
MAX_SECRET_BYTES = 4096


class SecretError(ValueError):
    """The shared secret cannot be read or is unusable; the message names where it was looked
    for, never its content."""


def sign(secret: bytes, body: bytes) -> str:
    """The header value for `body`: `sha256=<64 lowercase hex digits>`."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether `header` is the signature of `body` under `secret`, compared in constant time.

    A missing header, another algorithm or non-ASCII text is simply not the signature.
    """
    if not header or not secret:
        return False
    try:
        given = header.strip().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, sign(secret, body).encode("ascii"))


WEBHOOK_SECRET_ENV = "ASGCTL_WEBHOOK_SECRET"
"""Where the agent's push receiver and `asgctl notify` find their HMAC secret without a file."""


def load_secret(path: str | None, env: str) -> bytes:
    """The shared secret from the file `path` (one trailing newline dropped), else from the
    environment variable `env`; SecretError when neither gives a non-empty one.

    Never a command-line flag: argv is readable by every user of the host (`ps`).
    """
    if path:
        try:
            data = Path(path).read_bytes()[: MAX_SECRET_BYTES + 2]
        except OSError as exc:
            raise SecretError(f"{path}: cannot read the secret: {exc.strerror}") from None
        secret = data.removesuffix(b"\n").removesuffix(b"\r")
        where = path
    else:
        secret = os.environb.get(env.encode(), b"")
        where = f"${env}"
    if not secret:
        raise SecretError(f"{where}: no secret (empty or not set)")
    if len(secret) > MAX_SECRET_BYTES:
        raise SecretError(f"{where}: longer than {MAX_SECRET_BYTES} bytes")
    return secret
