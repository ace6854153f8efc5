"""Workers that `specpipe launch` does not start: already running (`specpipe worker`), maybe on another host.

The launch connects to them, checks what they run, and on the way out leaves them running with
every KV slot freed. It has no process to watch, so their liveness rests on heartbeats alone.
"""

from __future__ import annotations

from workers.curve import ClientKeys, is_loopback, load_key_pair, load_public_key
from workers.model.checkpoint import tokenizer_fingerprint
from workers.protocol.messages import Ready

ADDRESS_OPTIONS = {"target": "--target-addr", "draft": "--draft-addr"}
SERVER_KEY_OPTIONS = {"target": "--target-server-key", "draft": "--draft-server-key"}


def client_keys(addresses: dict[str, str], secret_key: str, server_keys: dict[str, str]) -> dict[str, ClientKeys]:
    """The CURVE keys for each remote worker, from the launch options; refuses combinations that leave a
    connection unencrypted off this host or a key without a use. `addresses` holds the remote roles only;
    `server_keys` maps every role to its --ROLE-server-key ("" when not given)."""
    for role, address in addresses.items():
        if not address.startswith(("tcp://", "ipc://")):
            raise ValueError(f"{ADDRESS_OPTIONS[role]} {address!r}: give tcp://HOST:PORT (or ipc://PATH)")
    for role, key in server_keys.items():
        if key and role not in addresses:
            raise ValueError(f"{SERVER_KEY_OPTIONS[role]} is for a running worker: give {ADDRESS_OPTIONS[role]} too")
        if key and not secret_key:
            raise ValueError(f"{SERVER_KEY_OPTIONS[role]} needs --curve-secret-key (this coordinator's key pair "
                             "from `specpipe keygen`)")
    if not secret_key:
        for role, address in addresses.items():
            if not is_loopback(address):
                raise ValueError(f"{ADDRESS_OPTIONS[role]} {address} is not on this host: connections across hosts "
                                 f"are encrypted; give --curve-secret-key and {SERVER_KEY_OPTIONS[role]}")
        return {}
    if not addresses:
        raise ValueError("--curve-secret-key is for running workers: give --target-addr and/or --draft-addr")
    own = load_key_pair(secret_key, "--curve-secret-key")
    keys = {}
    for role in addresses:
        if not server_keys.get(role):
            raise ValueError(f"{ADDRESS_OPTIONS[role]} with --curve-secret-key needs {SERVER_KEY_OPTIONS[role]}: "
                             f"the {role} worker's public key (NAME.key)")
        keys[role] = ClientKeys(own, load_public_key(server_keys[role], SERVER_KEY_OPTIONS[role]))
    return keys


def check_remote_workers(ready: dict[str, Ready], remote: dict[str, str], tokenizer_dir: str,
                         concurrency: int) -> None:
    """What a launch must know of workers it did not start: they tokenize as this coordinator does (it
    tokenizes with --target's tokenizer) and hold enough sequences."""
    if not remote:
        return
    local_hash = tokenizer_fingerprint(tokenizer_dir)
    for role, address in remote.items():
        worker = ready[role]
        if worker.role != role:
            raise ValueError(f"{ADDRESS_OPTIONS[role]} {address} is a {worker.role} worker (its --role), not a {role}")
        if worker.tokenizer_hash != local_hash:
            raise ValueError(f"the {role} worker at {address} ({worker.model!r}) uses another tokenizer than "
                             f"--target {tokenizer_dir} ({worker.tokenizer_hash} vs {local_hash}); point --target at "
                             "a local copy of the target checkpoint, for its tokenizer")
        if worker.slots < concurrency:
            raise ValueError(f"the {role} worker at {address} holds {worker.slots} sequences (its --slots); lower "
                             f"--concurrency to {worker.slots} or restart it with more --slots")
