"""HTTPS for `serve`: an SSL context from `--tls-cert`/`--tls-key`, or a throw-away self-signed certificate
(`--tls-self-signed`).

Browsers give `getUserMedia` (the microphone) only to secure contexts: https:// pages, or http://localhost. A page
opened from another machine over plain http:// cannot use the microphone, hence TLS on the server itself (or a
reverse proxy in front of it, docs/deploy.md). The page, the API, the websockets and WHEP all share the one port.

Every failure here is a `ConfigError` (one line, exit code 2), raised before the port opens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..settings.config import ConfigError


@dataclass(frozen=True)
class SelfSigned:
    cert_pem: bytes
    key_pem: bytes
    fingerprint: str  # SHA-256 of the DER certificate, AA:BB:... as browsers show it
    names: tuple[str, ...]  # DNS names and IP addresses in the subjectAltName


def fingerprint_sha256(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def served_names(host: str, addresses: set[str] | None = None, extra: list[str] | None = None) -> list[str]:
    """The names and addresses a browser may reach `host` by: localhost and 127.0.0.1 always; for a wildcard host
    (0.0.0.0, ::, empty) every address of this machine (`addresses`) and the host name; plus `extra` (the
    `--allowed-host` names, ports dropped)."""
    names: list[str] = ["localhost", "127.0.0.1", "::1"]
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), *sorted(addresses or ())]
    else:
        names.append(host)
    for h in extra or ():
        h = h.strip().lower()
        if h.startswith("["):
            h = h[1:].partition("]")[0]
        elif h.count(":") == 1:
            h = h.partition(":")[0]
        names.append(h)
    out: list[str] = []
    for n in names:
        n = n.split("%")[0]  # IPv6 scope ids are not part of an address in a certificate
        if n and n not in out:
            out.append(n)
    return out


def make_self_signed(names: list[str], days: int = 30) -> SelfSigned:
    """An EC P-256 certificate, valid `days` days, for `names` (IP addresses become IP SANs, the rest DNS SANs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vexpress-rt self-signed ({names[0]})")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return SelfSigned(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        fingerprint=fingerprint_sha256(cert.public_bytes(serialization.Encoding.DER)),
        names=tuple(names),
    )


def ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context from PEM files; missing, unreadable or mismatched files are a `ConfigError`."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: file not found")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{flag} {path}: not readable")
    if b"-----BEGIN CERTIFICATE-----" not in Path(cert).read_bytes():
        raise ConfigError(f"--tls-cert {cert}: not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    if b"PRIVATE KEY-----" not in Path(key).read_bytes():
        raise ConfigError(f"--tls-key {key}: not a PEM private key (-----BEGIN PRIVATE KEY-----)")
    if b"ENCRYPTED" in Path(key).read_bytes():
        raise ConfigError(f"--tls-key {key}: the key is encrypted; give it unencrypted (openssl pkey -in ... -out ...)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")  # never a prompt
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key {key} is not the private key of --tls-cert {cert}") from exc
        raise ConfigError(f"cannot use --tls-cert {cert} / --tls-key {key}: {reason} (PEM files expected)") from exc
    return ctx


def self_signed_context(names: list[str]) -> tuple[ssl.SSLContext, SelfSigned]:
    made = make_self_signed(names)
    with tempfile.TemporaryDirectory(prefix="vexpress-tls-") as tmp:  # the key never outlives the loading
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(made.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(made.key_pem)
        return ssl_context(str(cert), str(key)), made
