"""The transport: mutually authenticated, encrypted links between pi-client, pi-server and pi-dealer.

    credentials  role credentials (an Ed25519 key and a self-signed certificate naming the role),
                 single-operator credentials derived from one shared secret, the trusted peers of
                 each role, and the TLS 1.3 contexts built from them
    preface      the fixed-size plaintext preface a connector sends before TLS (so a listener can route
                 the raw connection to a session's worker process), the version refusal, and the
                 hand-over of an accepted connection to another process (SCM_RIGHTS)
    link         a framed, bounded message stream over TLS 1.3 (Python's ssl, i.e. OpenSSL), with byte
                 counters; any error ends the link

Every byte after the preface is TLS 1.3 with mutual certificate authentication; peers are pinned by
the SHA-256 of their certificate's public key, and a certificate proves one role. Nothing here is a
home-made handshake or cipher: TLS does the key exchange, the record protection and the replay,
reorder and truncation checks. Torch-free, like the rest of the control plane.

The version and the errors live here so that every module of the package shares them.
"""

from __future__ import annotations

from secure.control.protocol import PeerClosed, ProtocolError

VERSION = 3  # the wire protocol of this transport (the token-based control protocol was 2)
ALPN = f"deepreduce-pi/{VERSION}"  # bound into the TLS handshake: another version cannot complete it


class TransportError(ProtocolError):
    """A connection failed or was refused; one line, printed as `error: ...`."""


class HandshakeError(TransportError):
    """The peer was refused, or refused us: untrusted certificate, wrong role, other protocol version,
    altered preface. No application byte crosses a link that failed its handshake."""


class VersionMismatch(HandshakeError):
    """The two ends speak different protocol versions; the message names both."""

    def __init__(self, message: str, ours: int, theirs: int):
        super().__init__(message)
        self.ours, self.theirs = ours, theirs


class PrefaceError(TransportError):
    """A malformed preface (or a peer that does not speak this protocol at all)."""


class LinkError(TransportError):
    """An established link ended; after the first error every call on the link raises it again."""


class LinkClosed(LinkError, PeerClosed):
    """The peer closed the link (TLS close_notify), or this party did."""


class LinkTimeout(LinkError):
    """Nothing (or not enough) arrived within the timeout."""


class FrameTooLarge(LinkError):
    """The peer announced a message above the receiver's limit (refused before reading it)."""


class LinkTLSError(LinkError):
    """TLS refused a record: altered, replayed, reordered or dropped bytes, or the peer's TLS alert."""


class LinkTruncated(LinkTLSError):
    """The connection ended without TLS close_notify: truncated by someone on the path, or the peer died."""
