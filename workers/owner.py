"""Which coordinator a worker serves. One at a time: a Hello resets the worker, and a second
coordinator's Hello must not wipe the sequences of one that is still generating. Every other request
is the owner's alone: another peer can neither read nor change what the worker holds."""

from __future__ import annotations

from dataclasses import dataclass

OWNER_QUIET_S = 5.0  # a coordinator silent this long while holding sequences is taken for gone


@dataclass
class Owner:
    identity: bytes | None = None  # the ZeroMQ routing id of the coordinator's socket
    pid: int = 0
    last_seen: float = float("-inf")

    def saw(self, identity: bytes, now: float) -> None:
        if identity == self.identity:
            self.last_seen = now

    def refusal(self, identity: bytes, held: int, now: float) -> str | None:
        """Why a Hello from `identity` is refused while `held` sequences are in the cache; None: accept it."""
        if identity == self.identity or held == 0 or now - self.last_seen >= OWNER_QUIET_S:
            return None
        return (f"this worker is in use by another coordinator (pid {self.pid}, {held} sequence(s), last request "
                f"{now - self.last_seen:.1f} s ago); wait for it to finish, or start another worker (a coordinator "
                f"silent for {OWNER_QUIET_S:.0f} s is replaced)")

    def take(self, identity: bytes, pid: int, now: float) -> None:
        self.identity, self.pid, self.last_seen = identity, pid, now

    def stranger(self, identity: bytes, kind: str) -> str | None:
        """Why a request other than Hello or Shutdown from `identity` is refused; None: it is the owner's."""
        if self.identity is None:
            return f"no coordinator has said Hello to this worker; a {kind} comes after a Hello"
        if identity != self.identity:
            return (f"this worker serves another coordinator (pid {self.pid}); a {kind} is its owner's alone "
                    "(a coordinator takes a worker with Hello)")
        return None
