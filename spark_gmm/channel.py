"""The resident engine's connections between the driver and its tasks: authenticated, framed,
integrity-protected messages over TCP, with no allocation or wait that a peer controls.

Every fit draws a 256-bit key that reaches the tasks inside their Spark closure. The driver listens
on one address (never all interfaces) and speaks first:

    driver → task   32-byte random challenge
    task → driver   HELLO_BYTES, fixed: task index, task count, stage run (uint32 each), a 32-byte
                    nonce, HMAC-SHA256(key, "hello" ‖ challenge ‖ those fields ‖ nonce)
    driver → task   HMAC-SHA256(key, "welcome" ‖ challenge ‖ nonce)   (the task checks the driver)

The driver reads the hello in full, at a fixed size, within `handshake_seconds`, and compares it in
constant time; anything else (silence, garbage, a length prefix, a wrong key) closes the connection
and is logged, and happens in a thread of its own, so it cannot stall other connections. Both sides
then derive a session key, HMAC(key, "session" ‖ challenge ‖ nonce), and every message is

    sequence number (uint64), length (uint64), payload, HMAC-SHA256(session, direction ‖ header ‖ payload)

with sequence numbers counted per direction, so a message cannot be replayed, reordered, reflected
or moved to another connection. A receiver refuses a length above the limit it expects before
reading the payload, and reads the payload in chunks as it arrives, so memory follows the bytes
actually received. Every read of a started message waits at most `read_seconds`.

There is no encryption: Python's standard library has no TLS with a pre-shared key, and a
certificate infrastructure is out of place for a per-fit channel. What an observer of the network
sees is the pass parameters (means, covariances, sampled centres) and the partials (sums, counts,
and during k-means|| initialisation some sampled rows); see docs/reliability.md for when the
driver engine is chosen instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("spark_gmm")

KEY_BYTES = 32
_TAG_BYTES = 32
_NONCE_BYTES = 32
_FIELDS = struct.Struct("<III")
HELLO_BYTES = _FIELDS.size + _NONCE_BYTES + _TAG_BYTES
_HEADER = struct.Struct("<QQ")
_TO_TASK, _TO_DRIVER = b"D", b"T"
#: Payloads are read in chunks of at most this size, so memory grows only with bytes received.
_CHUNK = 1 << 20
#: Handshakes in progress at once; further connections are closed at once (a flood cannot pile up).
MAX_HANDSHAKES = 64


class ChannelError(ConnectionError):
    """A connection failed, timed out, or carried a message that is not authentic or not expected."""


@dataclass(frozen=True)
class Hello:
    index: int  # the task's partition in the barrier stage
    tasks: int  # tasks in the stage
    run: int  # which run of the stage (a rerun after a failure has the next number)


def _mac(key: bytes, *parts: bytes) -> bytes:
    digest = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        digest.update(part)
    return digest.digest()


def _read(sock: socket.socket, n: int, deadline: float | None = None,
          seconds: float | None = None) -> bytearray:
    """Exactly `n` bytes, each read within `seconds` or all of them before `deadline`."""
    buffer = bytearray()
    while len(buffer) < n:
        wait = seconds if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise ChannelError("timed out")
        sock.settimeout(wait)
        try:
            chunk = sock.recv(min(n - len(buffer), _CHUNK))
        except socket.timeout:
            raise ChannelError(f"no data for {wait:.3g} s") from None
        except OSError as error:
            raise ChannelError(str(error)) from None
        if not chunk:
            raise ChannelError("the peer closed the connection")
        buffer += chunk
    return buffer


class Channel:
    """One authenticated connection: `send` and `receive` whole messages."""

    def __init__(self, sock: socket.socket, session: bytes, outgoing: bytes, read_seconds: float):
        self.sock, self.session, self.read_seconds = sock, session, read_seconds
        self.outgoing = outgoing
        self.incoming = _TO_DRIVER if outgoing == _TO_TASK else _TO_TASK
        self.sent = self.received = 0
        self.peer = _peer(sock)

    def send(self, payload: bytes) -> None:
        header = _HEADER.pack(self.sent, len(payload))
        tag = _mac(self.session, self.outgoing, header, payload)
        self.sock.settimeout(self.read_seconds)
        try:
            self.sock.sendall(b"".join([header, payload, tag]))
        except OSError as error:  # socket.timeout included
            raise ChannelError(f"sending to {self.peer}: {error or 'timed out'}") from None
        self.sent += 1

    def receive(self, limit: int, alive: Callable[[], bool] = lambda: True, poll: float = 0.2) -> bytearray:
        """The next message (at most `limit` bytes). Waits for it to start as long as `alive()`;
        once started, each read waits at most `read_seconds`."""
        poller = select.poll()  # not select(): a driver's descriptors can be numbered above 1024
        poller.register(self.sock, select.POLLIN)
        while not poller.poll(int(poll * 1000)):  # data, a hang-up or an error all end the wait
            if not alive():
                raise ChannelError("the barrier stage ended while waiting for a reply")
        header = bytes(_read(self.sock, _HEADER.size, seconds=self.read_seconds))
        sequence, length = _HEADER.unpack(header)
        if sequence != self.received:
            raise ChannelError(f"message {sequence} from {self.peer}, expected {self.received}")
        if length > limit:
            raise ChannelError(f"message of {length} bytes from {self.peer}, above the expected {limit}")
        body = _read(self.sock, length + _TAG_BYTES, seconds=self.read_seconds)
        payload = memoryview(body)[:length]
        if not hmac.compare_digest(bytes(body[length:]), _mac(self.session, self.incoming, header, payload)):
            raise ChannelError(f"message from {self.peer} failed its integrity check")
        self.received += 1
        return body[:length]

    def close(self) -> None:
        _close(self.sock)


def _peer(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "a closed connection"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "a local socket"


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def connect(address: tuple[str, int], key: bytes, hello: Hello, handshake_seconds: float,
            read_seconds: float) -> Channel:
    """A task's channel to the driver, after both sides proved they hold `key`."""
    try:
        sock = socket.create_connection(address, timeout=handshake_seconds)
    except OSError as error:
        raise ChannelError(f"cannot connect to the driver at {address[0]}:{address[1]}: {error}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        deadline = time.monotonic() + handshake_seconds
        challenge = bytes(_read(sock, _NONCE_BYTES, deadline))
        nonce = secrets.token_bytes(_NONCE_BYTES)
        fields = _FIELDS.pack(hello.index, hello.tasks, hello.run) + nonce
        sock.settimeout(handshake_seconds)
        sock.sendall(fields + _mac(key, b"hello", challenge, fields))
        welcome = bytes(_read(sock, _TAG_BYTES, deadline))
        if not hmac.compare_digest(welcome, _mac(key, b"welcome", challenge, nonce)):
            raise ChannelError("the listener at the driver's address does not hold this fit's key")
        return Channel(sock, _mac(key, b"session", challenge, nonce), _TO_DRIVER, read_seconds)
    except BaseException:
        _close(sock)
        raise


class Listener:
    """The driver's end: accepts connections on `host`, authenticates each in its own thread and
    passes the authenticated ones to `admit(hello, channel)`, which returns False to refuse one."""

    def __init__(self, host: str, key: bytes, handshake_seconds: float, read_seconds: float,
                 admit: Callable[[Hello, Channel], bool]):
        self.key, self.handshake_seconds, self.read_seconds = key, handshake_seconds, read_seconds
        self.admit = admit
        family, _, _, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        self.server = socket.create_server(sockaddr, family=family)
        self.address = (host, self.server.getsockname()[1])
        self.server.settimeout(0.25)
        self.pending: set[socket.socket] = set()
        self.handshakes: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="spark_gmm-listener", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                sock, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            with self.lock:
                if len(self.pending) >= MAX_HANDSHAKES or self.stopped.is_set():
                    log.warning(
                        "resident engine: dropped a connection from %s: too many handshakes", _peer(sock)
                    )
                    _close(sock)
                    continue
                self.pending.add(sock)
                self.handshakes = [t for t in self.handshakes if t.is_alive()]
                thread = threading.Thread(target=self._handshake, args=(sock,), daemon=True)
                self.handshakes.append(thread)
            thread.start()

    def _handshake(self, sock: socket.socket) -> None:
        peer, admitted = _peer(sock), False
        try:
            deadline = time.monotonic() + self.handshake_seconds
            challenge = secrets.token_bytes(_NONCE_BYTES)
            sock.settimeout(self.handshake_seconds)
            sock.sendall(challenge)
            message = bytes(_read(sock, HELLO_BYTES, deadline))
            fields, tag = message[:-_TAG_BYTES], message[-_TAG_BYTES:]
            if not hmac.compare_digest(tag, _mac(self.key, b"hello", challenge, fields)):
                raise ChannelError("its hello does not carry this fit's key")
            nonce = fields[_FIELDS.size :]
            sock.sendall(_mac(self.key, b"welcome", challenge, nonce))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            channel = Channel(sock, _mac(self.key, b"session", challenge, nonce), _TO_TASK, self.read_seconds)
            with self.lock:
                self.pending.discard(sock)
                if self.stopped.is_set():
                    raise ChannelError("the listener is closed")
                admitted = self.admit(Hello(*_FIELDS.unpack(fields[: _FIELDS.size])), channel)
            if not admitted:
                raise ChannelError("not a task of the current stage run")
        except (ChannelError, OSError) as error:
            why = "the fit ended during its handshake" if self.stopped.is_set() else error
            log.warning("resident engine: dropped a connection from %s: %s", peer, why)
        finally:
            with self.lock:
                self.pending.discard(sock)
            if not admitted:
                _close(sock)

    def close(self) -> None:
        """Stop accepting, close every connection still in its handshake, and wait for those threads."""
        self.stopped.set()
        self.thread.join()
        _close(self.server)
        with self.lock:
            for sock in self.pending:  # wakes its handshake thread, which closes it
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            handshakes = list(self.handshakes)
        for thread in handshakes:
            thread.join(self.handshake_seconds)
