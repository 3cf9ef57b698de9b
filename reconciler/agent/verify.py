"""Trust checks on a fetched head: its signature, and the trailers that override safety gates.

Signatures are checked by git itself (`git verify-commit --raw`), so SSH signatures (against
an allowed-signers file, `gpg.ssh.allowedSignersFile`) and OpenPGP ones (against a keyring of
trusted public keys) are judged exactly as a developer's `git log --show-signature` would.
The keyring is the trust list: a key that is in it is trusted, anything else is not, so the
operator manages trust by managing one file.  Git never reads the host's git config or the
root user's own GnuPG keyring here: an agent must not trust whatever root happens to trust.

Git checks an SSH key's `valid-after`/`valid-before` (allowed signers) at the commit's own
committer date, which whoever signs chooses: a retired key (`valid-before="20250101"`) would
still sign a commit backdated to 2024.  So the agent hands git only the lines of the
allowed-signers file that are valid *now* by its own clock (`signers_valid_at`); git then
also checks them at the commit's date, and a key must pass both.

Trailer parsing is pure and lives here too, because the mass-revoke override is a statement
*in the signed commit*: `Asgctl-Allow-Mass-Revoke: true` only counts on a commit that passed
verification (when verification is on).
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.agent.source import clip
from reconciler.sources.gitio import git_env

_TRAILER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)\s*:\s*(.*?)\s*$")
_SSH_GOOD = re.compile(r'Good "git" signature (?:for (\S+) )?with (\S+) key (\S+)')
_GPG_GOOD = re.compile(r"^\[GNUPG:\] GOODSIG (\S+) (.*)$", re.MULTILINE)
_GPG_VALID = re.compile(r"^\[GNUPG:\] VALIDSIG (\S+)", re.MULTILINE)
_TRUE = ("true", "yes", "1", "on")


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """The verdict on one commit: `ok`, and the condition reason and message to report."""

    ok: bool
    reason: str
    message: str
    signer: str = ""


def parse_trailers(message: str) -> dict[str, list[str]]:
    """`Key: value` lines of the message's last paragraph, keys lower-cased (git's rule:
    trailers are the final block, and keys compare case-insensitively)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", message.strip()) if p.strip()]
    if len(paragraphs) < 2:  # the subject alone is never a trailer block
        return {}
    out: dict[str, list[str]] = {}
    lines = [x for x in paragraphs[-1].splitlines() if x.strip()]
    parsed = [_TRAILER.match(x) for x in lines]
    if not lines or not all(parsed):
        return {}
    for m in parsed:
        assert m is not None
        out.setdefault(m.group(1).lower(), []).append(m.group(2))
    return out


def trailer_true(message: str, key: str) -> bool:
    """Does the commit carry `key: true` (any of true/yes/1/on) as a trailer?"""
    values = parse_trailers(message).get(key.lower(), [])
    return any(v.strip().lower() in _TRUE for v in values)


_OPTION_NAMES = ("cert-authority", "namespaces=", "valid-after=", "valid-before=")
_SIGNER_TIME = re.compile(r"^([0-9]{8})(?:([0-9]{4})([0-9]{2})?)?(Z?)$", re.ASCII)


def _fields(line: str) -> list[str]:
    """Whitespace-separated fields, a double-quoted stretch staying in one field (as
    ssh-keygen reads principals and options)."""
    out, cur, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch in " \t" and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def _options(text: str) -> dict[str, str]:
    """`cert-authority,valid-before="2025..."` -> {name: value} (names lower-cased)."""
    out, cur, quoted = {}, "", False
    for ch in text + ",":
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            name, _, value = cur.partition("=")
            out[name.strip().lower()] = value.strip().strip('"')
            cur = ""
        else:
            cur += ch
    return out


def _signer_time(text: str) -> float | None:
    """ssh-keygen's absolute time: YYYYMMDD[HHMM[SS]], UTC with a trailing Z, else local."""
    m = _SIGNER_TIME.match(text)
    if m is None:
        return None
    stamp = m.group(1) + (m.group(2) or "0000") + (m.group(3) or "00")
    try:
        parsed = time.strptime(stamp, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return float(calendar.timegm(parsed) if m.group(4) else time.mktime(parsed))


def signers_valid_at(text: str, now: float) -> str:
    """The allowed-signers lines whose key is valid at `now` (comments and blank lines kept).

    A line whose `valid-after` is still ahead, whose `valid-before` has passed, or whose
    times cannot be read, is left out: a key nobody can show to be valid now signs nothing.
    """
    kept = []
    for line in text.splitlines():
        fields = _fields(line.strip())
        if not fields or fields[0].startswith("#"):
            kept.append(line)
            continue
        opts = {}
        if len(fields) > 1 and fields[1].lower().startswith(_OPTION_NAMES):
            opts = _options(fields[1])
        after, before = opts.get("valid-after"), opts.get("valid-before")
        start = _signer_time(after) if after is not None else float("-inf")
        end = _signer_time(before) if before is not None else float("inf")
        if start is None or end is None or not start <= now < end:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


class SignatureVerifier:
    """Runs `git verify-commit` against the configured trust sources only.

    `gpg_keyring` may be a GnuPG home directory (used as is) or a file of exported public
    keys, which is imported into a private home under `work_dir` and re-imported when the
    file changes.  Without one, GnuPG gets an empty private home: nothing OpenPGP verifies.
    """

    def __init__(
        self,
        allowed_signers: str | None,
        gpg_keyring: str | None,
        work_dir: str | os.PathLike[str],
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.allowed_signers = allowed_signers
        self.gpg_keyring = gpg_keyring
        self.work_dir = Path(work_dir)
        self.timeout = timeout
        self.clock = clock
        self._imported: str | None = None

    def _signers_now(self) -> str:
        """A copy of the allowed-signers file holding only the keys valid by our clock."""
        if not self.allowed_signers:
            return os.devnull
        text = Path(self.allowed_signers).read_text(encoding="utf-8", errors="replace")
        path = self.work_dir / "allowed_signers.valid-now"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(signers_valid_at(text, self.clock()), encoding="utf-8")
        return str(path)

    def _gnupg_home(self) -> str:
        if self.gpg_keyring and Path(self.gpg_keyring).is_dir():
            return self.gpg_keyring
        home = self.work_dir / "gnupg"
        if not self.gpg_keyring:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            return str(home)
        data = Path(self.gpg_keyring).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self._imported or not home.exists():
            # A fresh home per key file version: a key removed from the file must stop counting.
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(mode=0o700, parents=True)
            res = subprocess.run(
                ["gpg", "--batch", "--quiet", "--import"],
                input=data,
                capture_output=True,
                env={**git_env(), "GNUPGHOME": str(home)},
                timeout=self.timeout,
                check=False,
            )
            if res.returncode != 0:
                raise OSError(f"gpg --import {self.gpg_keyring}: {res.stderr.decode()[-300:]}")
            self._imported = digest
        return str(home)

    def verify(self, git_dir: str | os.PathLike[str], sha: str, signed: bool) -> SignatureCheck:
        """The verdict on `sha`; `signed` says whether the commit has a signature at all."""
        if not signed:
            return SignatureCheck(False, "UnsignedCommit", f"commit {sha[:12]} is not signed")
        try:
            home = self._gnupg_home()
        except OSError as exc:
            return SignatureCheck(False, "VerificationFailed", f"cannot load the keyring: {exc}")
        try:
            allowed = self._signers_now()
        except OSError as exc:
            return SignatureCheck(
                False, "VerificationFailed", f"cannot read the allowed signers: {exc}"
            )
        try:
            res = subprocess.run(
                [
                    "git",
                    f"--git-dir={git_dir}",
                    "-c",
                    f"gpg.ssh.allowedSignersFile={allowed}",
                    "verify-commit",
                    "--raw",
                    "--",
                    sha,
                ],
                capture_output=True,
                text=True,
                env={**git_env(), "GNUPGHOME": home, "LC_ALL": "C"},
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return SignatureCheck(False, "VerificationFailed", f"git verify-commit: {exc}")
        text = res.stderr + res.stdout
        if res.returncode == 0:
            signer = clip(_signer(text), 200)
            return SignatureCheck(
                True, "Succeeded", f"commit {sha[:12]} signed by {signer}", signer
            )
        # git's words quote the signature, which the signer wrote: cut and escaped.
        detail = clip(" / ".join(x.strip() for x in text.splitlines() if x.strip())[-300:], 300)
        return SignatureCheck(
            False,
            "UntrustedSignature",
            f"commit {sha[:12]} is signed, but not by a trusted key"
            + (f" ({detail})" if detail else ""),
        )


def _signer(text: str) -> str:
    m = _SSH_GOOD.search(text)
    if m:
        who = m.group(1) or "unknown principal"
        return f"{who} ({m.group(2)} {m.group(3)})"
    good = _GPG_GOOD.search(text)
    valid = _GPG_VALID.search(text)
    if good:
        return f"{good.group(2)} (OpenPGP {valid.group(1) if valid else good.group(1)})"
    return "a trusted key"
