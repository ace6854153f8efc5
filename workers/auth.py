"""Who may talk to a worker: CURVE with a list of authorized client keys, or this host alone.

With --curve-secret-key the worker's socket is a CURVE server and pyzmq's ThreadAuthenticator (a
ZAP handler in a thread of the worker) accepts exactly the public keys given with --curve-clients;
any other client fails its handshake and never reaches the worker's loop (workers/connection_log.py
logs the refusal). Without keys the worker listens only on loopback or ipc://.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from workers.curve import is_loopback, load_key_pair, load_public_keys
from workers.errors import SpecpipeError
from workers.worker_settings import WorkerSettings


@dataclass(frozen=True)
class AuthorizedKeys:
    """The ZAP credentials provider: a client is let in if its public key is listed."""

    keys: frozenset[bytes]

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def secure(context: zmq.Context, socket: zmq.Socket, spec: WorkerSettings) -> ThreadAuthenticator | None:
    """Makes `socket` a CURVE server for the clients `spec` authorizes (call before bind), or checks that
    `spec.bind` stays on this host. Returns the running authenticator (stop it at exit), if any."""
    if not spec.curve_secret_key:
        if spec.curve_clients:
            raise SpecpipeError("--curve-clients needs --curve-secret-key (this worker's key pair from "
                                "`specpipe keygen`)")
        if not is_loopback(spec.bind):
            raise SpecpipeError(f"refusing to listen on {spec.bind} without encryption: a worker without keys "
                                "binds only loopback (127.0.0.0/8, ::1, localhost) or ipc://; give "
                                "--curve-secret-key and --curve-clients to listen on other addresses")
        return None
    own = load_key_pair(spec.curve_secret_key, "--curve-secret-key")
    if not spec.curve_clients:
        raise SpecpipeError("--curve-secret-key needs --curve-clients: the public key files (or a directory "
                            "of *.key files) of the coordinators allowed to connect")
    clients = load_public_keys(spec.curve_clients, "--curve-clients")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=AuthorizedKeys(clients))
    socket.curve_secretkey = own.secret
    socket.curve_publickey = own.public
    socket.curve_server = True
    return authenticator
