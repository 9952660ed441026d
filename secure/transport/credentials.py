"""Role credentials, trusted peers and the TLS 1.3 contexts built from them.

A role credential is an Ed25519 key pair and a self-signed X.509 certificate whose subject names the
role and an id (O=deepreduce-pi, OU=<role>, CN=<id>, serialNumber=<the first 32 hex digits of the
fingerprint>). The last attribute makes every key's subject unique: OpenSSL finds a trust anchor by
subject, and with two trusted certificates of one subject (a key being rotated) it tries only one.

Peers are pinned: each role trusts a list of certificates per peer role (several at once, so one can
be rotated without downtime), identified by the SHA-256 of their SubjectPublicKeyInfo (the
`fingerprint` operators compare out of band). A certificate proves exactly one role: the same public
key is never trusted under two roles, and `peer_role` tells which role connected from the certificate
alone, never from what the peer claims.

Ed25519 works for TLS 1.3 with this Python and OpenSSL (3.0; tests/test_transport.py checks the
handshake), so no ECDSA fallback is needed.

Single-operator mode: one secret (>= 128 bits) held by all three roles. Python 3.11's ssl has no
TLS 1.3 external PSK, so each role's key is HKDF-SHA256(secret, role) and its certificate is built
from fixed fields (serial from the key, fixed dates and subject); Ed25519 signatures are deterministic,
so every holder of the secret builds every role's exact certificate and pins it. TLS then
authenticates with these keys as with any others. A derived public key is a test of any guess of the
secret (TLS 1.3 hides certificates from eavesdroppers, but a listener shows its certificate to
whoever connects, before it authenticates them), so the secret must be unguessable: under 128 bits it
is refused, and new ones have 256. Anyone holding the secret can act as every role: this mode is for
one operator running all three.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets as _random
import ssl
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deepreduce.errors import UserError
from secure.core.party import ROLE_NAMES
from secure.transport import ALPN, HandshakeError

ORGANIZATION = "deepreduce-pi"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16  # 128 bits: below that the secret could be guessed, and it is every role's key
DERIVED_ID = "shared"
_ID = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HKDF_SALT = b"deepreduce-pi transport v1 single-operator"  # domain separation; the secret is the entropy
_EPOCH = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
_NEVER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)  # RFC 5280: no expiry


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER), hex: what pins a peer."""
    return _key_fingerprint(cert.public_key())


def _key_fingerprint(public_key) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def identity(cert: x509.Certificate) -> tuple[str, str]:
    """(role, id) named by one of this project's certificates; UserError for anything else."""
    def one(oid):
        values = cert.subject.get_attributes_for_oid(oid)
        return values[0].value if len(values) == 1 else None
    role, id_ = one(NameOID.ORGANIZATIONAL_UNIT_NAME), one(NameOID.COMMON_NAME)
    if one(NameOID.ORGANIZATION_NAME) != ORGANIZATION or role not in ROLE_NAMES or not _ID.match(id_ or "") \
            or one(NameOID.SERIAL_NUMBER) != fingerprint(cert)[:32]:
        raise UserError(f"the certificate {fingerprint(cert)[:16]}... ({cert.subject.rfc4514_string()[:80]}) "
                        "is not a deepreduce-pi role certificate: make one with "
                        "`python -m secure.transport.credentials new ROLE ID`")
    return role, id_


def _check_role(role: str, id_: str) -> None:
    if role not in ROLE_NAMES:
        raise UserError(f"unknown role {role!r}: one of {', '.join(ROLE_NAMES)}")
    if not _ID.match(id_):
        raise UserError(f"id {id_!r} must be 1-64 letters, digits or . _ @ -")


def _certificate(key: ed25519.Ed25519PrivateKey, role: str, id_: str, serial: int,
                 not_before: datetime.datetime, not_after: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                      x509.NameAttribute(NameOID.COMMON_NAME, id_),
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, _key_fingerprint(key.public_key())[:32])])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after)
            # a leaf that can sign nothing else; every role is a TLS client on one link and a server on another
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, None))  # Ed25519: no separate hash, deterministic signature


@dataclass(frozen=True)
class RoleCredential:
    role: str
    id: str
    key: ed25519.Ed25519PrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)

    @classmethod
    def generate(cls, role: str, id_: str, days: int = 3650) -> "RoleCredential":
        """A fresh key pair and a self-signed certificate valid for `days` (rotation replaces it)."""
        _check_role(role, id_)
        key = ed25519.Ed25519PrivateKey.generate()
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        cert = _certificate(key, role, id_, x509.random_serial_number(), now - datetime.timedelta(hours=1),
                            now + datetime.timedelta(days=days))
        return cls(role, id_, key, cert)

    @classmethod
    def derive(cls, secret: bytes, role: str) -> "RoleCredential":
        """The single-operator credential of `role`: the same bytes for every holder of `secret`."""
        check_secret(secret)
        _check_role(role, DERIVED_ID)
        seed = HKDF(hashes.SHA256(), 32, _HKDF_SALT, b"deepreduce-pi role key\0" + role.encode()).derive(secret)
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        serial = int.from_bytes(hashlib.sha256(raw).digest()[:16], "big") >> 1 or 1  # positive, < 2**127
        return cls(role, DERIVED_ID, key, _certificate(key, role, DERIVED_ID, serial, _EPOCH, _NEVER))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def save(self, key_path, cert_path) -> None:
        """The key (mode 0600) and the certificate (0644) as PEM; refuses to overwrite either."""
        _write_new(cert_path, self.certificate_pem(), 0o644)
        _write_new(key_path, self.key_pem(), 0o600)

    @classmethod
    def load(cls, key_path, cert_path) -> "RoleCredential":
        cert = _load_certificates(cert_path)
        if len(cert) != 1:
            raise UserError(f"{cert_path} holds {len(cert)} certificates: a credential has exactly one")
        role, id_ = identity(cert[0])
        data = _read_private(key_path, "key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{key_path} is not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey) or _key_fingerprint(key.public_key()) != fingerprint(cert[0]):
            raise UserError(f"{key_path} is not the Ed25519 key of the certificate {cert_path}: pass the pair "
                            "that `python -m secure.transport.credentials new` wrote together")
        return cls(role, id_, key, cert[0])


    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes) -> "RoleCredential":
        cert = x509.load_pem_x509_certificate(cert_pem)
        role, id_ = identity(cert)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey) or _key_fingerprint(key.public_key()) != fingerprint(cert):
            raise UserError("a role key does not match its certificate")
        return cls(role, id_, key, cert)


# -- what a party process needs: its credential and its trusted peers, as bytes ---------------------------

NO_AUTH_SECRET = b"deepreduce-pi --no-auth: a public secret, no authentication"  # known to all: see below
SINGLE_OPERATOR, CREDENTIALS, NO_AUTH = "single-operator trust", "role credentials", "no authentication (--no-auth)"


@dataclass(frozen=True)
class PartyIdentity:
    """A role's credential and the certificates it trusts, as PEM bytes (picklable: a role hands it to
    its party processes). `trust_mode` says where they come from, for every output:
      single-operator trust  derived from the one secret all three roles hold (anyone with it is any role)
      role credentials       generated key pairs; each role pins its peers' certificates
      no authentication      derived from a public constant (--no-auth, loopback demos): TLS still
                             encrypts against a passive observer, but anyone can act as any role."""
    role: str
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    trusted_pem: str  # every trusted peer certificate (each names its role)
    trust_mode: str

    @classmethod
    def from_secret(cls, secret: bytes, role: str, trust_mode: str = SINGLE_OPERATOR) -> "PartyIdentity":
        own = RoleCredential.derive(secret, role)
        return cls(role, own.key_pem(), own.certificate_pem(), Trust.single_operator(secret).pem(), trust_mode)

    @classmethod
    def no_auth(cls, role: str) -> "PartyIdentity":
        return cls.from_secret(NO_AUTH_SECRET, role, NO_AUTH)

    @classmethod
    def from_files(cls, role: str, key_path, cert_path, trusted: dict[str, list]) -> "PartyIdentity":
        """`trusted`: peer role -> certificate files (several while one is rotated)."""
        own = RoleCredential.load(key_path, cert_path)
        if own.role != role:
            raise UserError(f"{cert_path} is a {own.role} certificate, not a {role} one: pass this pi-{role}'s own "
                            f"credential (`python -m secure.transport.credentials new {role} ID KEY CERT`)")
        trust = Trust()
        for peer, paths in trusted.items():
            for path in paths:
                trust.add_file(peer, path)
        return cls(role, own.key_pem(), own.certificate_pem(), trust.pem(), CREDENTIALS)

    def credential(self) -> RoleCredential:
        return RoleCredential.from_pem(self.key_pem, self.cert_pem)

    def trust(self) -> Trust:
        trust = Trust()
        for cert in x509.load_pem_x509_certificates(self.trusted_pem.encode()) if self.trusted_pem else []:
            trust.add(identity(cert)[0], cert)
        return trust


# -- secrets (single-operator mode) -------------------------------------------------------------------

def new_secret() -> bytes:
    return _random.token_bytes(SECRET_BYTES)


def check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        bits = 8 * len(secret) if isinstance(secret, (bytes, bytearray)) else 0
        raise UserError(f"the shared secret has {bits} bits, fewer than the {8 * MIN_SECRET_BYTES} it needs "
                        "(it is every role's key): make one with `python -m secure.transport.credentials "
                        "new-secret FILE` (256 bits)")
    return bytes(secret)


def write_secret(path, secret: bytes | None = None) -> bytes:
    """A new secret (or `secret`) as hex in a new file of mode 0600; returns it."""
    secret = check_secret(new_secret() if secret is None else secret)
    _write_new(path, secret.hex().encode() + b"\n", 0o600)
    return secret


def read_secret(path) -> bytes:
    text = _read_private(path, "secret").decode("ascii", "replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise UserError(f"{path} does not hold a hex secret: a passphrase is too easy to guess; make a secret "
                        "with `python -m secure.transport.credentials new-secret FILE`") from None
    return check_secret(secret)


# -- trusted peers --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    role: str
    id: str
    fingerprint: str


class Trust:
    """The certificates this party accepts, per peer role. A certificate must name the role it is
    trusted for, and one public key is never trusted under two roles."""

    def __init__(self):
        self._certs: dict[str, dict[str, x509.Certificate]] = {role: {} for role in ROLE_NAMES}

    @classmethod
    def single_operator(cls, secret: bytes) -> "Trust":
        trust = cls()
        for role in ROLE_NAMES:
            trust.add(role, RoleCredential.derive(secret, role).certificate)
        return trust

    def add(self, role: str, cert) -> "Trust":
        cert = cert.certificate if isinstance(cert, RoleCredential) else cert
        named, id_ = identity(cert)
        if named != role:
            raise UserError(f"the certificate of {named} {id_!r} ({fingerprint(cert)[:16]}...) is listed as a "
                            f"trusted {role}: a certificate proves only the role it names")
        fp = fingerprint(cert)
        for other, certs in self._certs.items():
            if other != role and fp in certs:
                raise UserError(f"the key {fp[:16]}... is trusted as a {other} and as a {role}: one key, one role")
        self._certs[role][fp] = cert
        return self

    def add_file(self, role: str, path) -> "Trust":
        """Every certificate of a PEM file (several, while one is being rotated out)."""
        for cert in _load_certificates(path):
            self.add(role, cert)
        return self

    def remove(self, role: str, fp: str) -> None:
        self._certs[role].pop(fp, None)

    def only(self, *roles: str) -> "Trust":
        """The same trust restricted to `roles` (what a context for those peers needs)."""
        sub = Trust()
        for role in roles:
            sub._certs[role] = dict(self._certs[role])
        return sub

    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, certs in self._certs.items() if certs)

    def lookup(self, fp: str) -> Peer | None:
        for role, certs in self._certs.items():
            if fp in certs:
                return Peer(role, identity(certs[fp])[1], fp)
        return None

    def pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                       for certs in self._certs.values() for c in certs.values())


def peer_role(tls, trust: Trust) -> Peer:
    """Which trusted role (and id) the peer of a finished handshake is, by its certificate's public key.
    `tls` is an ssl.SSLSocket or ssl.SSLObject. Raises HandshakeError for an untrusted certificate."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise HandshakeError("the peer presented no certificate")
    fp = fingerprint(x509.load_der_x509_certificate(der))
    peer = trust.lookup(fp)
    if peer is None:
        raise HandshakeError(f"the peer's certificate {fp[:16]}... is not trusted for "
                             f"{' or '.join(trust.roles()) or 'any role'}")
    return peer


# -- TLS contexts ----------------------------------------------------------------------------------------

def server_context(own: RoleCredential, trust: Trust) -> ssl.SSLContext:
    """For the listening side: accepts peers of the roles in `trust` (use trust.only(...))."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, own, trust)
    ctx.num_tickets = 0  # no session resumption: every connection runs the full mutual handshake
    return ctx


def client_context(own: RoleCredential, trust: Trust) -> ssl.SSLContext:
    """For the connecting side: `trust` holds the certificates of the one role it connects to."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, own, trust)


def _context(protocol: int, own: RoleCredential, trust: Trust) -> ssl.SSLContext:
    if not trust.roles():
        raise UserError(f"this pi-{own.role} trusts no peer certificate: list the peers' certificates "
                        "(or use one shared secret for all roles)")
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are pinned by certificate (trust anchors + peer_role), not by name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=trust.pem())  # the trusted peers' self-signed certs, nothing else
    ctx.set_alpn_protocols([ALPN])
    _load_own(ctx, own)
    return ctx


def _load_own(ctx: ssl.SSLContext, own: RoleCredential) -> None:
    """Python's ssl loads a key only from a file: use an anonymous memory file where Linux has one
    (the key never touches a disk), else a private temporary directory removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("cert", "key")]
        try:
            for fd, data in zip(fds, (own.certificate_pem(), own.key_pem())):
                os.write(fd, data)
            ctx.load_cert_chain(*(f"/proc/self/fd/{fd}" for fd in fds))
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        _write_new(cert, own.certificate_pem(), 0o600)
        _write_new(key, own.key_pem(), 0o600)
        ctx.load_cert_chain(cert, key)


# -- files ------------------------------------------------------------------------------------------------

def _write_new(path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UserError(f"{path} exists: pick another file (a credential is never overwritten)") from None
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read_private(path, what: str) -> bytes:
    """A key or secret file, refused when its group or others may read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UserError(f"the {what} file {path} is open to group or others (mode {stat.S_IMODE(mode):04o}): "
                                f"run `chmod 600 {path}`")
            return f.read()
    except OSError as exc:
        raise UserError(f"cannot read the {what} file {path} ({exc.strerror})") from None


def _load_certificates(path) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
        return x509.load_pem_x509_certificates(data)
    except OSError as exc:
        raise UserError(f"cannot read the certificate file {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise UserError(f"{path} holds no PEM certificate ({exc})") from None


# -- `python -m secure.transport.credentials` ------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    from deepreduce.errors import exit_status
    p = argparse.ArgumentParser(prog="python -m secure.transport.credentials",
                                description="make transport credentials and secrets")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="a fresh role credential: KEY (mode 0600) and CERT (give CERT to the peers)")
    new.add_argument("role", choices=ROLE_NAMES)
    new.add_argument("id")
    new.add_argument("key")
    new.add_argument("cert")
    sec = sub.add_parser("new-secret", help="a 256-bit secret for single-operator mode (mode 0600)")
    sec.add_argument("file")
    fp = sub.add_parser("fingerprint", help="the fingerprints of a certificate file (compare them out of band)")
    fp.add_argument("cert")
    args = p.parse_args(argv)

    def run():
        if args.command == "new":
            cred = RoleCredential.generate(args.role, args.id)
            cred.save(args.key, args.cert)
            print(f"{args.role} {args.id} {cred.fingerprint}")
        elif args.command == "new-secret":
            write_secret(args.file)
            print(f"wrote a 256-bit secret to {args.file}")
        else:
            for cert in _load_certificates(args.cert):
                print(*identity(cert), fingerprint(cert))
    return exit_status(run)


if __name__ == "__main__":
    raise SystemExit(main())
