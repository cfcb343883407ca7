"""
Who may use the relay: token files for relay-clients and for users.

The Go relay leaves authentication to an ingress in front of it; many users
run it without one, and the relay is a door into robots. Both files hold
only SHA-256 hashes of tokens (a leaked file opens nothing), are compared in
constant time, and are re-read when they change, so tokens can be rotated
without a restart.

Relay-client tokens (C{--client_tokens}), one per line::

    # NAME_GLOB  SHA256_HEX
    robot-*      9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

User tokens (C{--user_tokens}), one per line::

    # SHA256_HEX  NAME_GLOB[,NAME_GLOB...]
    2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae  robot-1,lab-*

Print the hash of a token read from stdin with
C{python -m relay.server.auth hash < token.txt}.
"""

import hashlib
import hmac
import os
import sys
from fnmatch import fnmatchcase
from typing import List, Optional, Tuple


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["hash"]:
        sys.stderr.write("usage: python -m relay.server.auth hash < token-file\n")
        return 2
    token = sys.stdin.read().strip()
    if not token:
        sys.stderr.write("no token on stdin\n")
        return 1
    print(token_hash(token))
    return 0


if __name__ == "__main__":
    # Before Twisted is imported: the hash needs none, and run from the
    # repository's root, its twisted/ folder (the plugins) hides Twisted.
    sys.exit(main())

from twisted.logger import Logger  # noqa: E402

log = Logger()


def bearer(header_value: Optional[bytes]) -> Optional[str]:
    """The token of an C{Authorization: Bearer TOKEN} header, if that is one."""
    if not header_value:
        return None
    scheme, _, token = header_value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class TokenFileError(ValueError):
    pass


class _WatchedFile:
    """A file parsed again whenever its size, inode or mtime change."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: Optional[Tuple[int, int, int]] = None
        self.entries: List[Tuple[str, Tuple[str, ...]]] = []
        self.refresh(initial=True)

    def parse(self, text: str) -> List[Tuple[str, Tuple[str, ...]]]:
        raise NotImplementedError

    def refresh(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if initial:
                raise TokenFileError("cannot read %s: %s" % (self.path, e.strerror)) from e
            return  # keep the last good version while the file is replaced
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                entries = self.parse(f.read())
        except (OSError, TokenFileError, UnicodeDecodeError) as e:
            if initial:
                raise TokenFileError(str(e)) from e
            log.error("Keeping previous tokens: cannot load token file", Path=self.path, error=str(e))
            return
        self._stamp = stamp
        self.entries = entries
        if not initial:
            log.info("Reloaded token file", Path=self.path, Entries=len(entries))


def _lines(text: str, path: str):
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line.split()


def _check_hash(value: str, path: str, number: int) -> str:
    value = value.lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise TokenFileError("%s:%d: not a SHA-256 hex digest: %r" % (path, number, value))
    return value


class ClientTokens(_WatchedFile):
    """C{NAME_GLOB SHA256_HEX} lines: which relay-client token may act for which names."""

    def parse(self, text):
        entries = []
        for number, fields in _lines(text, self.path):
            if len(fields) != 2:
                raise TokenFileError("%s:%d: expected NAME_GLOB SHA256_HEX" % (self.path, number))
            entries.append((_check_hash(fields[1], self.path, number), (fields[0],)))
        return entries

    def allows(self, token: Optional[str], name: str) -> bool:
        if token is None:
            return False
        self.refresh()
        return _match(self.entries, token_hash(token), name)


class UserTokens(_WatchedFile):
    """C{SHA256_HEX NAME_GLOB[,NAME_GLOB...]} lines: which user token may reach which backends."""

    def parse(self, text):
        entries = []
        for number, fields in _lines(text, self.path):
            if len(fields) != 2:
                raise TokenFileError("%s:%d: expected SHA256_HEX NAME_GLOB[,NAME_GLOB...]" % (self.path, number))
            globs = tuple(g for g in fields[1].split(",") if g)
            entries.append((_check_hash(fields[0], self.path, number), globs))
        return entries

    def allows(self, token: str, name: str) -> bool:
        self.refresh()
        return _match(self.entries, token_hash(token), name)


def _match(entries, digest: str, name: str) -> bool:
    # Compare against every entry so that timing tells nothing about which
    # (or whether any) hash matched.
    allowed = False
    for expected, globs in entries:
        if hmac.compare_digest(expected, digest) and any(fnmatchcase(name, g) for g in globs):
            allowed = True
    return allowed


class AccessPolicy:
    """
    The checks the resources make: open by default, as the Go relay is.

    @param client_tokens: relay-clients must present a token valid for the
        backend name they act on.
    @param user_tokens: users must present a token valid for the backend
        they call, in C{Authorization: Bearer} or C{X-Relay-Token}.
    @param trusted_user_header: users must arrive through an authenticating
        proxy that sets this header (oauth2-proxy, IAP).
    """

    def __init__(
        self,
        client_tokens: Optional[ClientTokens] = None,
        user_tokens: Optional[UserTokens] = None,
        trusted_user_header: Optional[str] = None,
    ):
        self.client_tokens = client_tokens
        self.user_tokens = user_tokens
        self.trusted_user_header = trusted_user_header.encode("latin-1") if trusted_user_header else None

    def relay_client_allowed(self, request, name: str) -> bool:
        if self.client_tokens is None:
            return True
        token = bearer(request.requestHeaders.getRawHeaders(b"authorization", [None])[0])
        return self.client_tokens.allows(token, name)

    def check_user(self, request, name: str, consume: bool = True):
        """
        C{None} if the user may call backend C{name}, else C{(status,
        message)}. The credential the relay consumed is removed from the
        request, so it is not relayed to the backend; unless C{consume} is
        false, for a call passed on to the replica that owns C{name}, which
        checks it again.
        """
        headers = request.requestHeaders
        if self.trusted_user_header is not None:
            if not (headers.getRawHeaders(self.trusted_user_header) or [b""])[0].strip():
                return 401, "Unauthorized: this relay only accepts requests through its authenticating proxy"
        if self.user_tokens is None:
            return None
        token = None
        relay_token = headers.getRawHeaders(b"x-relay-token")
        if relay_token:
            token = relay_token[0].decode("latin-1").strip() or None
            if consume:
                headers.removeHeader(b"x-relay-token")
        else:
            token = bearer(headers.getRawHeaders(b"authorization", [None])[0])
            if token is not None and consume:
                headers.removeHeader(b"authorization")
        if token is None:
            return 401, "Unauthorized: send a relay token in Authorization: Bearer or X-Relay-Token"
        if not self.user_tokens.allows(token, name):
            return 403, "Forbidden: this token may not reach %s" % (name,)
        return None
