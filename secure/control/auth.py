"""Who may talk to whom: role credentials, the shared token of single-operator mode, and control
connections over the transport's mutually authenticated TLS 1.3 links.

Every connection to pi-server's or pi-dealer's port starts with the transport's 32-byte preface
(secure.transport.preface) and then runs TLS 1.3 with certificates on both sides
(secure.transport.link). A certificate proves one role (secure.transport.credentials): pi-server
accepts control connections from clients only, pi-dealer from servers only; a session's party links
are routed to its worker and checked there the same way. There is no other handshake: TLS does the key
exchange, the authentication and the record protection, and every control message travels inside it.

Where the credentials come from (`security_from_args`, the same flags on every role):

  role credentials    --key/--cert (this role's key pair, `python -m secure.transport.credentials
                      new ROLE ID KEY CERT`) and --trust-server/--trust-client/--trust-dealer (the
                      certificates of the peers it accepts; several to rotate one without downtime)
  single-operator     one shared token (--token-file FILE or $DEEPREDUCE_TOKEN, a hex secret of at
                      least 128 bits; `python -m secure.control.auth new-token FILE` makes 256): each
                      role's key is derived from it with HKDF, so whoever holds it can act as any role
  --no-auth           keys derived from a public constant (loopback demos only): TLS still encrypts
                      against a passive observer, but anyone can act as any role

The token never crosses the wire and is never on the command line (process lists show it).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass, field

from secure.control import protocol
from secure.control.protocol import AuthError, ControlChannel, ControlError, PeerClosed, ProtocolError
from secure.core.party import ROLE_NAMES
from secure.transport import FrameTooLarge, HandshakeError, LinkClosed, LinkError, LinkTimeout
from secure.transport.credentials import (CREDENTIALS, NO_AUTH, SINGLE_OPERATOR, PartyIdentity, client_context,
                                          server_context)
from secure.transport.link import Link
from secure.transport.preface import CONTROL, Preface

TOKEN_ENV = "DEEPREDUCE_TOKEN"
MIN_TOKEN_CHARS = 32  # hex digits: 128 bits
_ID = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
# Who may open a control connection to whom: clients ask servers for info and sessions; servers ask
# dealers to join sessions. Nobody else: a client cannot ask a dealer for anything.
CONTROL_PEERS = {"server": ("client",), "dealer": ("server",)}


# -- the shared token (single-operator mode) ------------------------------------------------------

def _check_token(token: str, where: str) -> bytes:
    """A token is hex with at least 128 bits: it is every role's transport key (through HKDF), and a
    passphrase would be open to offline guessing (a derived certificate is a test of any guess)."""
    if len(token) < MIN_TOKEN_CHARS or len(token) % 2 or not all(c in "0123456789abcdefABCDEF" for c in token):
        raise ControlError(f"the token in {where} is not a hex secret of at least {MIN_TOKEN_CHARS * 4} bits "
                           f"({MIN_TOKEN_CHARS} hex digits): make one with `python -m secure.control.auth new-token FILE`")
    return bytes.fromhex(token)


def read_token_file(path: str) -> bytes:
    """The shared secret of a token file (one hex token; `#` starts a comment)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlError(f"cannot read token file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: token file {path} is readable by other users: chmod 600 {path}", file=sys.stderr, flush=True)
    tokens = [line.split("#", 1)[0].split() for line in text.splitlines()]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise ControlError(f"token file {path} holds no token: make one with `python -m secure.control.auth new-token FILE`")
    if len(tokens) > 1 or len(tokens[0]) > 1:
        raise ControlError(f"token file {path} holds more than one token: it holds the one shared secret of "
                           "single-operator mode (per-party identities are role credentials: --key/--cert)")
    return _check_token(tokens[0][0], path)


def load_token(token_file: str | None) -> bytes | None:
    if token_file:
        return read_token_file(token_file)
    value = os.environ.get(TOKEN_ENV, "").strip()
    return _check_token(value, f"${TOKEN_ENV}") if value else None


@dataclass
class Security:
    """What a role needs to open or accept connections: its transport identity (credential and trusted
    peers), its display name and the handshake timeout."""
    party: PartyIdentity
    identity: str = ""  # --id: this party's name in logs and replies (a certificate's id is what counts)
    handshake_timeout: float = protocol.DEFAULT_HANDSHAKE_TIMEOUT
    _contexts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def no_auth(self) -> bool:
        return self.party.trust_mode == NO_AUTH

    @classmethod
    def from_env(cls, role: str = "client") -> "Security":
        """The token in $DEEPREDUCE_TOKEN (single-operator trust), else no authentication."""
        secret = load_token(None)
        return cls(PartyIdentity.from_secret(secret, role) if secret else PartyIdentity.no_auth(role), role)

    def server_context(self, peers: tuple[str, ...]):
        """A listening TLS context that accepts the roles `peers` (cached: it loads the key once)."""
        key = ("server", tuple(peers))
        if key not in self._contexts:
            self._contexts[key] = server_context(self.party.credential(), self.party.trust().only(*peers))
        return self._contexts[key]


def add_arguments(p: argparse.ArgumentParser, listener: bool, connector: bool, default_id: str) -> None:
    g = p.add_argument_group("authentication (TLS 1.3 with role certificates on every connection)")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"single-operator mode: the shared hex token (default: ${TOKEN_ENV}); every role's key is "
                        "derived from it. Never pass a token on the command line")
    g.add_argument("--no-auth", action="store_true",
                   help="no authentication: local demos only (listeners refuse to bind a non-loopback address)")
    g.add_argument("--key", metavar="PEM", help="this role's key (`python -m secure.transport.credentials "
                                                "new ROLE ID KEY CERT`), instead of a shared token")
    g.add_argument("--cert", metavar="PEM", help="the certificate of --key (give it to the peers)")
    for peer in ROLE_NAMES:
        g.add_argument(f"--trust-{peer}", metavar="PEM", action="append", default=[],
                       help=f"certificates of the pi-{peer}s this role accepts (repeat, or several in one file, "
                            "to rotate a key without downtime)")
    g.add_argument("--id", default=default_id, help=f"this party's name in logs and replies (default {default_id})")
    g.add_argument("--handshake-timeout", type=float, default=protocol.DEFAULT_HANDSHAKE_TIMEOUT,
                   help="seconds a peer has to complete the preface and the TLS handshake (default 10)")


def security_from_args(args, listen_host: str | None = None, role: str = "client") -> Security:
    if not _ID.match(args.id or ""):
        raise ControlError(f"--id {args.id!r} must be 1-64 letters, digits or . _ @ -")
    if args.handshake_timeout <= 0:
        raise ControlError("--handshake-timeout must be positive")
    party = party_identity(args, role)
    if party.trust_mode == NO_AUTH and listen_host is not None and not protocol.is_loopback(listen_host):
        raise ControlError(f"--no-auth only listens on a loopback address, not {listen_host}: give every party a "
                           f"token (--token-file or ${TOKEN_ENV}) or role credentials (--key/--cert/--trust-*)")
    return Security(party, args.id, args.handshake_timeout)


def party_identity(args, role: str) -> PartyIdentity:
    """This role's transport identity: --key/--cert with --trust-* (role credentials), else derived from
    the shared token (single-operator trust), else public (--no-auth)."""
    key, cert = getattr(args, "key", None), getattr(args, "cert", None)
    trusted = {peer: getattr(args, f"trust_{peer}", []) for peer in ROLE_NAMES if peer != role}
    sources = [name for name, used in (("--key/--cert", key or cert), ("--token-file", args.token_file),
                                       ("--no-auth", args.no_auth)) if used]
    if len(sources) > 1:
        raise ControlError(f"{' and '.join(sources)} exclude each other: pick one way to authenticate")
    if bool(key) != bool(cert):
        raise ControlError("--key and --cert go together (this role's transport credential)")
    if key:
        return PartyIdentity.from_files(role, key, cert, trusted)
    if any(trusted.values()) or getattr(args, f"trust_{role}", []):
        raise ControlError("--trust-* lists the peers of a role credential: pass --key and --cert too")
    if args.no_auth:
        return PartyIdentity.no_auth(role)
    secret = load_token(args.token_file)
    if secret is None:
        raise ControlError(f"no credentials: pass --key/--cert and --trust-* (role credentials), or put a shared token "
                           f"in a file (`python -m secure.control.auth new-token FILE`) and pass --token-file FILE or "
                           f"set ${TOKEN_ENV}; for a local demo only, pass --no-auth")
    return PartyIdentity.from_secret(secret, role)


# -- control channels over links ---------------------------------------------------------------------

class LinkControlChannel(ControlChannel):
    """A control connection over a transport Link: TLS authenticates, orders and encrypts every message,
    so messages carry no MAC or sequence number of their own. The peer's role and id come from its
    certificate."""

    def __init__(self, link: Link, peer_addr: str = "", limit_key: str = ""):
        super().__init__(None, link.peer.id, link.peer.role, peer_addr, limit_key)
        self.link = link

    def fileno(self) -> int:
        return self.link.fileno()

    def pending(self) -> bool:
        return self.link.buffered()

    def getsockname(self):
        return self.link.getsockname()

    def close(self) -> None:
        self.link.close(timeout=0.5)

    def send(self, type_: str, **fields) -> None:
        body = protocol.message_body({"type": type_, **fields})
        try:
            self.link.send(body)
        except LinkError as exc:
            raise PeerClosed(f"connection lost while sending {type_!r} ({exc})") from None

    def recv(self, timeout: float, max_bytes: int = protocol.MAX_MESSAGE_BYTES) -> dict:
        try:
            return protocol.decode(bytes(self.link.recv(max_bytes, timeout)))
        except LinkTimeout:
            raise ProtocolError(f"timed out after {timeout:g} s waiting for the peer") from None
        except LinkClosed:
            raise PeerClosed("the peer closed the connection") from None
        except FrameTooLarge as exc:
            raise ProtocolError(str(exc)) from None


def open_channel(host: str, port: int, security: Security, connect_timeout: float, read_timeout: float,
                 what: str, role: str = "client") -> LinkControlChannel:
    """Connect (retrying for `connect_timeout`), send the preface, run the TLS handshake; the peer must
    prove it is a pi-`what` ('server' or 'dealer') with a certificate this party trusts."""
    sock = protocol.connect(host, port, connect_timeout, what)
    address = protocol.format_address(host, port)
    party = security.party
    trust = party.trust().only(what)
    try:
        link = Link.connect(sock, client_context(party.credential(), trust), trust, (what,),
                            # the peer may still be starting (its port is bound before its slow imports)
                            max(read_timeout, security.handshake_timeout), preface=Preface(CONTROL, role),
                            peer=f"{what} at {address}", max_frame=protocol.MAX_MESSAGE_BYTES)
    except HandshakeError as exc:
        hint = " (single-operator trust: do both hold the same token?)" if party.trust_mode == SINGLE_OPERATOR else ""
        raise AuthError(f"{exc}{hint}") from None
    return LinkControlChannel(link, address)


def accept_control(sock, got: Preface, security: Security, listener_role: str, peer_addr: str) -> LinkControlChannel:
    """The listening side of a control connection whose preface was read: TLS, and the peer must be a
    role allowed to ask this one (CONTROL_PEERS). Queries are limited per client certificate with role
    credentials (give each client its own for its own quota), per address otherwise."""
    allowed = CONTROL_PEERS[listener_role]
    # TLS accepts any trusted peer; the link then refuses, with the reason, one whose certificate proves
    # another role than this port takes control connections from (it learns why, nothing else).
    trust = security.party.trust()
    try:
        link = Link.accept(sock, security.server_context(trust.roles()), trust, allowed, security.handshake_timeout,
                           preface=got, peer=f"{got.role} at {peer_addr}", max_frame=protocol.MAX_MESSAGE_BYTES)
    except HandshakeError as exc:
        raise AuthError(str(exc)) from None
    ip = peer_addr.rsplit(":", 1)[0]
    per_cert = security.party.trust_mode == CREDENTIALS
    return LinkControlChannel(link, peer_addr, f"cert:{link.peer.fingerprint[:16]}" if per_cert else f"ip:{ip}")


def request(host: str, port: int, msg: dict, connect_timeout: float, read_timeout: float, what: str,
            *reply_types: str, security=None, role: str = "client") -> dict:
    """One request, one reply, on a fresh authenticated connection to a pi-`what`. `security` defaults
    to the token in $DEEPREDUCE_TOKEN (single-operator trust; no authentication if unset)."""
    security = security or Security.from_env(role)
    with open_channel(host, port, security, connect_timeout, read_timeout, what, role) as ch:
        ch.send(msg["type"], **{k: v for k, v in msg.items() if k != "type"})
        return protocol.expect(ch.recv(read_timeout), *reply_types)


# -- `python -m secure.control.auth new-token FILE` ------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m secure.control.auth",
                                description="make the shared token of single-operator mode (mode 600)")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="write a fresh random 256-bit token to FILE (refuses to overwrite)")
    new.add_argument("file")
    args = p.parse_args(argv)
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {args.file} exists: pick another file", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.file} ({exc.strerror})", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    print(f"wrote a token to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
