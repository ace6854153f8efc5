"""ZeroMQ CURVE key files and the loopback rule, shared by the coordinator and the workers.

Key files are ZeroMQ's own certificates, written by `specpipe keygen` (zmq.auth.create_certificates):
NAME.key holds a public key (hand it to the other side), NAME.key_secret holds the key pair (keep it).
A worker without keys listens only on this host (loopback or ipc://); across hosts every connection
is encrypted and both ends authenticated.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from workers.errors import SpecpipeError

LOCAL_TRANSPORTS = ("ipc://", "inproc://")


class KeyFileError(SpecpipeError):
    """A key file that is missing or does not hold what the option wants."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes


@dataclass(frozen=True)
class ClientKeys:
    """What a coordinator's socket needs to reach one CURVE worker."""

    own: KeyPair
    server_public: bytes

    def apply(self, socket: zmq.Socket) -> None:
        """Call before connect."""
        socket.curve_secretkey = self.own.secret
        socket.curve_publickey = self.own.public
        socket.curve_serverkey = self.server_public


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost; False for anything else
    (a wildcard `*`, another interface or host name, another transport)."""
    if address.startswith(LOCAL_TRANSPORTS):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rpartition(":")[0]
    host = host.split(";")[-1]  # tcp://source;destination: the destination counts
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_key_pair(path: str | os.PathLike, option: str) -> KeyPair:
    """The key pair in a NAME.key_secret file; the error names `option`."""
    public, secret = _read(path, option)
    if secret is None:
        raise KeyFileError(f"{option}: {path} holds only a public key; give the NAME.key_secret file that "
                        "`specpipe keygen` wrote next to it")
    return KeyPair(public, secret)


def load_public_key(path: str | os.PathLike, option: str) -> bytes:
    return _read(path, option)[0]


def load_public_keys(paths: tuple[str, ...], option: str) -> frozenset[bytes]:
    """Public keys from key files and from every *.key file in the directories among `paths`."""
    keys: set[bytes] = set()
    for path in paths:
        if Path(path).is_dir():
            files = sorted(Path(path).glob("*.key"))
            if not files:
                raise KeyFileError(f"{option}: directory {path} holds no *.key files "
                                   "(public keys from `specpipe keygen`)")
            keys.update(load_public_key(file, option) for file in files)
        else:
            keys.add(load_public_key(path, option))
    return frozenset(keys)


def _read(path: str | os.PathLike, option: str) -> tuple[bytes, bytes | None]:
    if not Path(path).is_file():
        raise KeyFileError(f"{option}: no key file at {path} (make one with `specpipe keygen DIR --name NAME`)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{option}: {path} is not a ZeroMQ key file ({error})") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"{option}: {path} holds a malformed key (expected 40 Z85 characters)")
    return public, secret


def keygen(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Writes DIRECTORY/NAME.key (public) and DIRECTORY/NAME.key_secret (mode 0600); never overwrites."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"--name {name!r}: give a plain file name such as 'coordinator' or 'target'")
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists; remove it or choose another --name")
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret is never readable by others, not even for an instant
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    public.chmod(0o644)
    return public, secret
