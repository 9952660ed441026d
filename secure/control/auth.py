"""Who may talk to whom: shared tokens, a mutual HMAC handshake, optional TLS, dealer attestations.

Tokens
    A token is a random hex secret (at least 128 bits, 32 hex digits; ``python -m secure.control.auth
    new-token FILE`` makes 256). The shared token is also the single-operator secret of the session
    links: each role's transport key is derived from it (secure.transport.credentials). It comes from ``--token-file FILE`` or the ``DEEPREDUCE_TOKEN`` environment
    variable, never from the command line (process lists show it). A token file holds either one
    token (shared by every party) or lines ``ID TOKEN`` (one token per identity, e.g. per client);
    ``#`` starts a comment. A party that connects uses the line of its own ``--id``, else the shared
    token; a party that listens accepts any identity it has a line for, or any identity with the
    shared token.

Handshake (I = the party that connects, R = the one that listens; v2 control frames)::

    I -> R  {"type": "hello", "role", "id", "nonce": 64 hex, "auth": "hmac-sha256" | "none"}
    R -> I  {"type": "challenge", "role", "id", "nonce": 64 hex, "auth", "proof": 64 hex}
    I -> R  {"type": "auth", "proof": 64 hex}
    R -> I  {"type": "ready", "seq": 0, "mac": ...}            the first authenticated message

    T         = canonical JSON of ["deepreduce-pi/2", I.role, I.id, I.nonce, R.role, R.id, R.nonce]
    R's proof = HMAC-SHA256(token, "responder" 0x00 T)    checked by I before I sends anything else
    I's proof = HMAC-SHA256(token, "initiator" 0x00 T)    checked by R before any session exists
    key       = HMAC-SHA256(token, "session" 0x00 T)      MACs every later message (secure.control.protocol)

The token never crosses the wire; both nonces are fresh, so neither a proof nor a key can be
replayed on another connection. With ``--no-auth`` (loopback only) the same four messages carry
no proofs and later messages no MACs.

Dealer attestation
    The dealer and the clients that trust it can share a second secret, the dealer token
    (``--dealer-token-file`` or ``DEEPREDUCE_DEALER_TOKEN``), which the server does not hold. For
    each session the client sends a fresh nonce; the dealer answers the server's join with
    ``HMAC-SHA256(dealer token, canonical JSON of ["deepreduce-pi/2 dealer", dealer id, session id,
    rendezvous port, nonce])``; the server forwards it and a client started with ``--dealer-id NAME``
    refuses the session unless it verifies, before its party shares anything.
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
import secrets
import socket
import ssl
import stat
import sys
from dataclasses import dataclass, field

from secure.control import protocol
from secure.control.protocol import AuthError, ControlChannel, ControlError, ProtocolError
from secure.core.party import ROLE_NAMES, ROLES
from secure.transport.credentials import PartyIdentity

TOKEN_ENV = "DEEPREDUCE_TOKEN"
DEALER_TOKEN_ENV = "DEEPREDUCE_DEALER_TOKEN"
SCHEME = "hmac-sha256"
LABEL = "deepreduce-pi/2"
MIN_TOKEN_CHARS = 32  # hex digits: 128 bits
_ID = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
SHARED = "*"


# -- tokens ---------------------------------------------------------------------------------------

def _check_token(token: str, where: str) -> bytes:
    """A token is hex with at least 128 bits: the shared one is also every role's transport key (HKDF),
    and a passphrase would be open to offline guessing."""
    if len(token) < MIN_TOKEN_CHARS or len(token) % 2 or not all(c in "0123456789abcdefABCDEF" for c in token):
        raise ControlError(f"the token in {where} is not a hex secret of at least {MIN_TOKEN_CHARS * 4} bits "
                           f"({MIN_TOKEN_CHARS} hex digits): make one with `python -m secure.control.auth new-token FILE`")
    return token.encode()


def read_token_file(path: str) -> dict[str, bytes]:
    """{identity or SHARED: token bytes} from a token file (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlError(f"cannot read token file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: token file {path} is readable by other users: chmod 600 {path}", file=sys.stderr, flush=True)
    keyring = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not _ID.match(fields[0])):
            raise ControlError(f"line {number} of token file {path} is not `TOKEN` or `ID TOKEN` "
                               "(ID: letters, digits, . _ @ -)")
        name = fields[0] if len(fields) == 2 else SHARED
        if name in keyring:
            raise ControlError(f"token file {path} has two tokens for {'the shared token' if name == SHARED else name}")
        keyring[name] = _check_token(fields[-1], f"line {number} of {path}")
    if not keyring:
        raise ControlError(f"token file {path} holds no token: make one with `python -m secure.control.auth new-token FILE`")
    return keyring


def load_keyring(token_file: str | None, env: str = TOKEN_ENV) -> dict[str, bytes] | None:
    if token_file:
        return read_token_file(token_file)
    value = os.environ.get(env, "").strip()
    return {SHARED: _check_token(value, f"${env}")} if value else None


@dataclass
class Credentials:
    identity: str
    keyring: dict[str, bytes] = field(default_factory=dict)
    no_auth: bool = False

    def own_token(self) -> bytes:
        token = self.keyring.get(self.identity) or self.keyring.get(SHARED)
        if token is None:
            raise ControlError(f"the token file has no line for this party's --id {self.identity!r} and no shared token")
        return token

    def token_for(self, peer_id: str) -> tuple[bytes | None, bool]:
        """(token, whether it is the peer's own named token)."""
        if peer_id in self.keyring and peer_id != SHARED:
            return self.keyring[peer_id], True
        return self.keyring.get(SHARED), False


@dataclass
class Security:
    """Everything a role needs to open or accept control connections."""
    creds: Credentials
    server_tls: ssl.SSLContext | None = None  # listeners: --tls-cert/--tls-key
    client_tls: ssl.SSLContext | None = None  # connectors: --tls-ca
    handshake_timeout: float = protocol.DEFAULT_HANDSHAKE_TIMEOUT
    party: PartyIdentity | None = None  # the credential and trusted peers of the session's TLS links

    @classmethod
    def from_env(cls, identity: str = "client") -> "Security":
        keyring = load_keyring(None)
        return cls(Credentials(identity, keyring or {}, no_auth=keyring is None))


def add_arguments(p: argparse.ArgumentParser, listener: bool, connector: bool, default_id: str) -> None:
    g = p.add_argument_group("authentication and TLS")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"shared token (or `ID TOKEN` lines); default: ${TOKEN_ENV}. Never pass a token on the command line")
    g.add_argument("--no-auth", action="store_true",
                   help="no authentication: local demos only (listeners refuse to bind a non-loopback address)")
    g.add_argument("--id", default=default_id, help=f"this party's identity in the handshake (default {default_id})")
    g.add_argument("--handshake-timeout", type=float, default=protocol.DEFAULT_HANDSHAKE_TIMEOUT,
                   help="seconds a peer has to complete the TLS and token handshake (default 10)")
    t = p.add_argument_group("party links (TLS 1.3; default: derived from the shared token, single-operator trust)")
    t.add_argument("--key", metavar="PEM", help="this role's transport key (`python -m secure.transport.credentials "
                                                "new ROLE ID KEY CERT`)")
    t.add_argument("--cert", metavar="PEM", help="the certificate of --key (give it to the peers)")
    for peer in ROLE_NAMES:
        t.add_argument(f"--trust-{peer}", metavar="PEM", action="append", default=[],
                       help=f"certificates of the pi-{peer}s this role accepts (repeat, or several in one file, "
                            "to rotate a key without downtime)")
    if listener:
        g.add_argument("--tls-cert", metavar="PEM", help="serve the control port over TLS with this certificate chain")
        g.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    if connector:
        g.add_argument("--tls-ca", metavar="PEM",
                       help="connect over TLS and verify the peer's certificate against this CA bundle")


def security_from_args(args, listen_host: str | None = None, role: str | None = None) -> Security:
    if not _ID.match(args.id or ""):
        raise ControlError(f"--id {args.id!r} must be 1-64 letters, digits or . _ @ -")
    if args.handshake_timeout <= 0:
        raise ControlError("--handshake-timeout must be positive")
    if args.no_auth and args.token_file:
        raise ControlError("--no-auth and --token-file exclude each other: drop one")
    keyring = None if args.no_auth else load_keyring(args.token_file)
    if keyring is None and not args.no_auth:
        raise ControlError(f"no token: put a shared secret in a file (`python -m secure.control.auth new-token FILE`) and pass "
                           f"--token-file FILE, or set ${TOKEN_ENV}; for a local demo only, pass --no-auth")
    if args.no_auth and listen_host is not None and not protocol.is_loopback(listen_host):
        raise ControlError(f"--no-auth only listens on a loopback address, not {listen_host}: "
                           f"give every party a token (--token-file or ${TOKEN_ENV})")
    server_tls = client_tls = None
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if bool(cert) != bool(key):
        raise ControlError("--tls-cert and --tls-key go together")
    if cert:
        server_tls = _context(lambda: _server_context(cert, key), cert)
    ca = getattr(args, "tls_ca", None)
    if ca:
        client_tls = _context(lambda: _client_context(ca), ca)
    party = party_identity(args, role, keyring) if role else None
    return Security(Credentials(args.id, keyring or {}, no_auth=keyring is None), server_tls, client_tls,
                    args.handshake_timeout, party)


def party_identity(args, role: str, keyring: dict[str, bytes] | None) -> PartyIdentity:
    """This role's credential for the session links: --key/--cert with --trust-* (role credentials),
    else derived from the shared token (single-operator trust), else public (--no-auth)."""
    key, cert = getattr(args, "key", None), getattr(args, "cert", None)
    if bool(key) != bool(cert):
        raise ControlError("--key and --cert go together (this role's transport credential)")
    if key:
        trusted = {peer: getattr(args, f"trust_{peer}", []) for peer in ROLE_NAMES if peer != role}
        return PartyIdentity.from_files(role, key, cert, trusted)
    if any(getattr(args, f"trust_{peer}", []) for peer in ROLE_NAMES):
        raise ControlError("--trust-* lists the peers of a role credential: pass --key and --cert too")
    if keyring is None:
        return PartyIdentity.no_auth(role)
    if SHARED not in keyring:
        raise ControlError(f"this pi-{role} has only named tokens, so no shared secret to derive the party links' "
                           "keys from: pass --key/--cert and --trust-* (python -m secure.transport.credentials new)")
    return PartyIdentity.from_secret(bytes.fromhex(keyring[SHARED].decode()), role)


def _context(make, path: str) -> ssl.SSLContext:
    try:
        return make()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ControlError(f"cannot load the TLS file {path} ({getattr(exc, 'strerror', None) or exc})") from None


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _client_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- the handshake ---------------------------------------------------------------------------------

def _hmac(key: bytes, label: str, transcript: bytes) -> str:
    return hmac.new(key, label.encode() + b"\0" + transcript, "sha256").hexdigest()


def _transcript(i_role, i_id, i_nonce, r_role, r_id, r_nonce) -> bytes:
    return protocol.canonical([LABEL, i_role, i_id, i_nonce, r_role, r_id, r_nonce])


def _raw_recv(sock, deadline: float) -> dict:
    return protocol.recv(sock, max(0.01, deadline - _now()))


def _now() -> float:
    import time
    return time.monotonic()


def initiate(sock, creds: Credentials, role: str, expect_role: str, timeout: float, peer: str) -> ControlChannel:
    """The connecting side's handshake; returns the authenticated channel."""
    deadline = _now() + timeout
    nonce = secrets.token_hex(32)
    protocol.send(sock, "hello", role=role, id=creds.identity, nonce=nonce, auth="none" if creds.no_auth else SCHEME)
    try:
        reply = protocol.expect(_raw_recv(sock, deadline), "challenge")
    except protocol.BusyError:
        raise
    except protocol.RemoteError as exc:
        raise AuthError(f"the {peer} refused the connection: {exc}") from None
    except ProtocolError as exc:
        raise ProtocolError(f"no handshake from the {peer} ({exc}); if it serves TLS, pass --tls-ca") from None
    r_role = protocol.field(reply, "role", str, lambda r: r in ROLES, "a role")
    r_id = protocol.field(reply, "id", str, _ID.match, "an identity")
    r_nonce = protocol.field(reply, "nonce", str, lambda n: protocol.is_hex(n, 64), "64 hex digits")
    r_auth = protocol.field(reply, "auth", str, lambda a: a in (SCHEME, "none"), "an auth scheme")
    if r_role != expect_role:
        raise ControlError(f"the {peer} is a pi-{r_role}, not a pi-{expect_role}")
    if creds.no_auth:
        protocol.send(sock, "auth", proof=None)
        ch = ControlChannel(sock, None, True, r_id, r_role)
    else:
        if r_auth == "none":
            raise AuthError(f"the {peer} runs without authentication (--no-auth): this party holds a token and "
                            "refuses an unauthenticated peer (pass --no-auth to talk to it anyway)")
        token = creds.own_token()
        t = _transcript(role, creds.identity, nonce, r_role, r_id, r_nonce)
        proof = reply.get("proof")
        if not isinstance(proof, str) or not hmac.compare_digest(proof.encode("ascii", "replace"),
                                                                 _hmac(token, "responder", t).encode()):
            raise AuthError(f"the {peer} could not prove it holds this party's token: the tokens differ "
                            f"(check --token-file / ${TOKEN_ENV} on both sides)")
        protocol.send(sock, "auth", proof=_hmac(token, "initiator", t))
        ch = ControlChannel(sock, bytes.fromhex(_hmac(token, "session", t)), True, r_id, r_role)
    try:
        protocol.expect(ch.recv(max(0.01, deadline - _now())), "ready")
    except protocol.RemoteError as exc:
        raise AuthError(f"the {peer} refused the connection: {exc}") from None
    return ch


def respond(sock, creds: Credentials, role: str, timeout: float, peer_addr: str) -> ControlChannel:
    """The listening side's handshake; AuthError/ProtocolError before any session state exists."""
    deadline = _now() + timeout
    hello = _raw_recv(sock, deadline)
    if hello["type"] != "hello":
        raise ProtocolError(f"expected the handshake's 'hello' first, got {hello['type'][:40]!r} "
                            "(is the peer an older version?)")
    i_role = protocol.field(hello, "role", str, lambda r: r in ROLES, "client, server or dealer")
    i_id = protocol.field(hello, "id", str, _ID.match, "an identity (1-64 letters, digits, . _ @ -)")
    i_nonce = protocol.field(hello, "nonce", str, lambda n: protocol.is_hex(n, 64), "64 lowercase hex digits")
    i_auth = protocol.field(hello, "auth", str, lambda a: a in (SCHEME, "none"), f"{SCHEME!r} or 'none'")
    nonce = secrets.token_hex(32)
    ip = peer_addr.rsplit(":", 1)[0]
    if creds.no_auth:
        protocol.send(sock, "challenge", role=role, id=creds.identity, nonce=nonce, auth="none", proof=None)
        protocol.expect(_raw_recv(sock, deadline), "auth")
        ch = ControlChannel(sock, None, False, i_id, i_role, peer_addr, limit_key=f"ip:{ip}")
        ch.send("ready")
        return ch
    if i_auth == "none":
        raise AuthError(f"this pi-{role} requires authentication: give the peer the token "
                        f"(--token-file or ${TOKEN_ENV})")
    token, named = creds.token_for(i_id)
    known = token is not None
    token = token or secrets.token_bytes(32)  # an unknown identity fails like a wrong token
    t = _transcript(i_role, i_id, i_nonce, role, creds.identity, nonce)
    protocol.send(sock, "challenge", role=role, id=creds.identity, nonce=nonce, auth=SCHEME,
                  proof=_hmac(token, "responder", t))
    msg = protocol.expect(_raw_recv(sock, deadline), "auth")
    proof = msg.get("proof")
    if not known or not isinstance(proof, str) or not hmac.compare_digest(
            proof.encode("ascii", "replace"), _hmac(token, "initiator", t).encode()):
        raise AuthError(f"authentication failed for {i_role} {i_id!r}: wrong token")
    ch = ControlChannel(sock, bytes.fromhex(_hmac(token, "session", t)), False, i_id, i_role, peer_addr,
                 limit_key=f"id:{i_id}" if named else f"ip:{ip}")
    ch.send("ready")
    return ch


# -- connections -------------------------------------------------------------------------------------

def open_channel(host: str, port: int, security: Security, connect_timeout: float, read_timeout: float,
                 what: str, role: str = "client") -> ControlChannel:
    """Connect (retrying for `connect_timeout`), TLS if configured, then the handshake. `what` is
    the role expected at the other end ('server' or 'dealer')."""
    sock = protocol.connect(host, port, connect_timeout, what)
    address = protocol.format_address(host, port)
    try:
        if security.client_tls is not None:
            sock = _tls_connect(sock, security, host, what, address)
        # The peer may still be starting (its port is bound before its slow imports): wait as long
        # as for any reply. The listening side's --handshake-timeout protects it from slow peers.
        return initiate(sock, security.creds, role, what, max(read_timeout, security.handshake_timeout),
                        f"{what} at {address}")
    except BaseException:
        sock.close()
        raise


def _tls_connect(sock, security: Security, host: str, what: str, address: str):
    try:
        sock.settimeout(security.handshake_timeout)
        tls = security.client_tls.wrap_socket(sock, server_hostname=host)
        return tls
    except ssl.SSLCertVerificationError as exc:
        raise AuthError(f"the {what} at {address} has a certificate that --tls-ca does not vouch for "
                        f"({exc.verify_message})") from None
    except (ssl.SSLError, OSError) as exc:
        raise ControlError(f"TLS handshake with the {what} at {address} failed "
                           f"({getattr(exc, 'reason', None) or exc}): does it run with --tls-cert?") from None


def accept(sock: socket.socket, security: Security, role: str, peer_addr: str) -> ControlChannel:
    """TLS (if configured) and the responder's handshake on an accepted socket."""
    if security.server_tls is not None:
        try:
            sock.settimeout(security.handshake_timeout)
            sock = security.server_tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise AuthError(f"TLS handshake failed ({getattr(exc, 'reason', None) or exc})") from None
    return respond(sock, security.creds, role, security.handshake_timeout, peer_addr)


# -- dealer attestation ------------------------------------------------------------------------------

def attest(key: bytes, dealer_id: str, session_id: str, port: int, nonce: str) -> str:
    return hmac.new(key, protocol.canonical([LABEL + " dealer", dealer_id, session_id, port, nonce]),
                    "sha256").hexdigest()


def verify_attestation(key: bytes, dealer_id: str, session_id: str, port: int, nonce: str, attestation) -> bool:
    return isinstance(attestation, str) and hmac.compare_digest(
        attestation.encode("ascii", "replace"), attest(key, dealer_id, session_id, port, nonce).encode())


def dealer_key(path: str | None) -> bytes | None:
    """The dealer token (see the module docstring), or None."""
    keyring = load_keyring(path, DEALER_TOKEN_ENV)
    if keyring is None:
        return None
    if set(keyring) != {SHARED}:
        raise ControlError("a dealer token file holds one token (no `ID TOKEN` lines)")
    return keyring[SHARED]


# -- `python -m secure.control.auth new-token FILE` ------------------------------------------------------------

def request(host: str, port: int, msg: dict, connect_timeout: float, read_timeout: float, what: str,
            *reply_types: str, security=None, role: str = "client") -> dict:
    """One request, one reply, on a fresh authenticated connection to a pi-`what`. `security` (a
    Security) defaults to the token in $DEEPREDUCE_TOKEN (no authentication if unset)."""
    security = security or Security.from_env(role)
    with open_channel(host, port, security, connect_timeout, read_timeout, what, role) as ch:
        ch.send(msg["type"], **{k: v for k, v in msg.items() if k != "type"})
        return protocol.expect(ch.recv(read_timeout), *reply_types)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m secure.control.auth", description="make a token file (mode 600)")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="write a fresh random token to FILE (refuses to overwrite)")
    new.add_argument("file")
    new.add_argument("--id", help="write an `ID TOKEN` line (appended if FILE exists) instead of a shared token")
    args = p.parse_args(argv)
    if args.id is not None and not _ID.match(args.id):
        print(f"error: --id {args.id!r} must be 1-64 letters, digits or . _ @ -", file=sys.stderr)
        return 2
    token = secrets.token_hex(32)
    line = f"{args.id} {token}\n" if args.id else f"{token}\n"
    try:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if args.id else os.O_EXCL)
        fd = os.open(args.file, flags, 0o600)
    except FileExistsError:
        print(f"error: {args.file} exists: pick another file (or use --id NAME to append a named token)",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.file} ({exc.strerror})", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        f.write(line)
    print(f"wrote a token to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

