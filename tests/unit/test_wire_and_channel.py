"""The resident engine's codec and channel on their own (no Spark): passes survive the wire exactly,
malformed messages are refused, and the listener drops every connection that does not prove the key
without allocating, waiting or failing on the peer's say."""

import logging
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from pyspark import cloudpickle

from spark_gmm import channel, kernels, marginal, wire
from spark_gmm.mixture import Mixture


def mixture(rng, k=3, d=4):
    a = rng.normal(size=(k, d, d))
    return Mixture.from_covariances(rng.random(k) + 0.1, rng.normal(size=(k, d)), a @ a.transpose(0, 2, 1) + np.eye(d))


def every_pass(rng, d=4):
    centers = rng.normal(size=(5, d))
    singles = [
        kernels.EStepPass([mixture(rng, 3, d), mixture(rng, 2, d)]),
        kernels.HardAssignmentPass(centers),
        kernels.CostPass(centers),
        kernels.ClosestWeightPass(centers),
        kernels.SamplePass(centers, cost=3.0, oversampling=40.0, seed=5, stream=2),
        kernels.SmallestUniformPass(d, 7, seed=5, stream=0),
    ]
    return singles + [
        kernels.ConcatPass([singles[0], singles[4], kernels.ConcatPass(singles[1:3])]),
        marginal.CompleteRowsPass(kernels.ConcatPass([singles[0], singles[1]])),  # handleInvalid='keep' starts
    ]


def assert_same_attributes(a, b):
    if isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype and (a.strides == b.strides or min(b.shape, default=0) < 2)
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_attributes(x, y)
    elif hasattr(b, "__dict__"):
        assert type(a) is type(b) and vars(a).keys() == vars(b).keys()
        for name in vars(b):
            assert_same_attributes(getattr(a, name), getattr(b, name))
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("index", range(8))
def test_a_pass_survives_the_wire_exactly(rng, index):
    # The driver engine's tasks get the pass through pickle: the wire gives them the same arrays.
    pass_ = cloudpickle.loads(cloudpickle.dumps(every_pass(rng)[index]))
    decoded = wire.decode_pass(wire.encode_pass(pass_))
    assert type(decoded) is type(pass_)
    assert_same_attributes(decoded, pass_)
    raw = rng.normal(size=(300, 4))
    w = rng.random(300)
    half = np.full(4, 0.5)  # a data shift
    np.testing.assert_array_equal(decoded.map_block(raw, half, w), pass_.map_block(raw, half, w))
    a, b = pass_.map_block(raw[:100], None, None), pass_.map_block(raw[100:], None, None)
    np.testing.assert_array_equal(decoded.combine(a.copy(), b), pass_.combine(a.copy(), b))


@pytest.mark.parametrize("index", range(8))
def test_partials_stay_within_the_bound_the_driver_accepts(rng, index):
    pass_ = every_pass(rng)[index]
    blocks = [rng.normal(size=(n, 4)) for n in (50, 1, 120)]
    parts = [(p, pass_.map_block(b, None, None)) for p, b in enumerate(blocks)]
    assert sum(len(a) for _, a in parts) <= wire.partial_bound(pass_, partitions=3, rows=171)
    assert len(wire.encode_partials(parts)) <= wire.reply_limit(pass_, partitions=3, rows=171)


def mixed_passes(rng, n=200):
    """The latent class model's passes over packed mixed rows with missing values (NaN), and the rows."""
    from spark_gmm import latent

    columns, levels = latent.Columns(2, 2, 1, 1), (3,)
    rows = columns.pack(
        rng.normal(size=(n, 2)), (rng.random((n, 2)) < 0.4).astype(float), rng.integers(0, 3, (n, 1)),
        rng.poisson(3.0, (n, 1)).astype(float),
    )
    rows[rng.random(rows.shape) < 0.15] = np.nan
    start = latent.MixedStartPass(3, [4, 5], levels, columns)
    layout = latent.Layout(3, 2, 2, levels, 1)
    models = [
        latent.initial_model(part, layout, kind, 1e-6)
        for part, kind in zip(start.split(start.map_block(rows, None, None)), ("full", "diag"))
    ]
    singles = [start, latent.MixedEStepPass(models, columns)]
    return singles + [kernels.ConcatPass(singles)], rows


@pytest.mark.parametrize("index", range(3))
def test_a_mixed_pass_survives_the_wire_exactly_within_its_bound(rng, index):
    passes, rows = mixed_passes(rng)
    pass_ = cloudpickle.loads(cloudpickle.dumps(passes[index]))
    decoded = wire.decode_pass(wire.encode_pass(pass_))
    assert_same_attributes(decoded, pass_)
    blocks = list(zip(np.split(rows, [60, 61]), np.split(rng.random(len(rows)), [60, 61])))
    half = np.full(rows.shape[1], 0.5)  # a data shift
    parts = [(p, pass_.map_block(b, half, w)) for p, (b, w) in enumerate(blocks)]
    for (b, w), (_, part) in zip(blocks, parts):
        np.testing.assert_array_equal(decoded.map_block(b, half, w), part)
    assert len(wire.encode_partials(parts)) <= wire.reply_limit(pass_, partitions=3, rows=len(rows))
    assert sum(len(a) for _, a in parts) == wire.partial_bound(pass_, partitions=3, rows=len(rows))


def test_unregistered_classes_and_values_are_refused(rng):
    class Foreign(kernels.SumPass):
        def __init__(self):
            self.centers = np.zeros(2)

    with pytest.raises(wire.WireError, match="cannot send pass"):
        wire.encode_pass(Foreign())
    with pytest.raises(wire.WireError, match=r"pass.centers \(int64 array\)"):
        wire.encode_pass(kernels.CostPass(np.arange(3)))
    renamed = wire.encode_pass(kernels.CostPass(np.zeros((2, 2)))).replace(b"CostPass", b"CostPasz")
    with pytest.raises(wire.WireError, match="'CostPasz' is not registered"):
        wire.decode_pass(renamed)
    with pytest.raises(wire.WireError, match="not registered as a pass"):
        wire.partial_bound(Foreign(), 1, 1)


def test_every_truncation_or_extension_of_a_message_is_refused(rng):
    message = wire.encode_pass(every_pass(rng)[-1])
    for cut in range(len(message)):
        with pytest.raises(wire.WireError):
            wire.decode_pass(message[:cut])
    with pytest.raises(wire.WireError, match="after the pass"):
        wire.decode_pass(message + b"N")
    for junk in (b"", b"Z", b"L\xff\xff\xff\xff", b"A\x02\x00\x01" + struct.pack("<qq", -1, 4), b"A\x01\x01" + struct.pack("<q", 1), os.urandom(64)):
        with pytest.raises(wire.WireError):
            wire.decode_pass(junk)


def test_partials_round_trip_and_bad_replies_are_refused():
    parts = [(0, np.arange(3.0)), (2, np.array([])), (4, np.array([7.5]))]
    decoded = wire.decode_partials(wire.encode_partials(parts), partitions=5)
    assert [p for p, _ in decoded] == [0, 2, 4]
    for (_, a), (_, b) in zip(decoded, parts):
        np.testing.assert_array_equal(a, b)
    assert wire.decode_partials(wire.encode_partials([]), 5) == []
    for bad, match in [
        (wire.encode_partials([(5, np.ones(1))]), "unknown or repeated"),
        (wire.encode_partials([(1, np.ones(1)), (1, np.ones(1))]), "unknown or repeated"),
        (wire.encode_partials(parts)[:-8], "do not add up"),
        (wire.encode_partials(parts) + b"\0" * 8, "do not add up"),
        (struct.pack("<q", 10**9), "claims"),
        (b"abc", "not a list"),
    ]:
        with pytest.raises(wire.WireError, match=match):
            wire.decode_partials(bad, partitions=5)


# -- the channel ----------------------------------------------------------------------------------


class Driver:
    """A listener on loopback that admits tasks of run 1 and records them."""

    def __init__(self, handshake_seconds=0.5, read_seconds=2.0):
        self.key = os.urandom(channel.KEY_BYTES)
        self.admitted = []
        self.arrived = threading.Event()

        def admit(hello, link):
            self.admitted.append((hello, link))
            self.arrived.set()
            return hello.run == 1

        self.listener = channel.Listener("127.0.0.1", self.key, handshake_seconds, read_seconds, admit)
        self.address = self.listener.address

    def task(self, key=None, run=1):
        return channel.connect(self.address, key or self.key, channel.Hello(0, 1, run), 2.0, 2.0)


@pytest.fixture
def driver():
    d = Driver()
    yield d
    d.listener.close()


def closed_by_peer(sock, within=5.0) -> bool:
    """True when the other side closes `sock` within `within` seconds (reading whatever it sent)."""
    sock.settimeout(within)
    try:
        while sock.recv(1 << 16):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_authenticated_messages_both_ways(driver):
    task = driver.task()
    assert driver.arrived.wait(5)
    hello, link = driver.admitted[0]
    assert hello == channel.Hello(0, 1, 1)
    link.send(b"pass")
    assert task.receive(100) == b"pass"
    task.send(b"partials" * 100)
    assert link.receive(800) == b"partials" * 100
    task.close()
    with pytest.raises(channel.ChannelError, match="closed"):
        link.receive(800)
    link.close()


def test_a_wrong_key_is_dropped_before_admission(driver, caplog):
    with caplog.at_level(logging.WARNING, logger="spark_gmm"):
        with pytest.raises(channel.ChannelError):
            driver.task(key=os.urandom(channel.KEY_BYTES))
        time.sleep(0.2)
    assert driver.admitted == []
    assert "does not carry this fit's key" in caplog.text


def test_a_task_refuses_a_listener_without_the_key(driver):
    impostor = socket.create_server(("127.0.0.1", 0))
    try:
        def answer():
            sock, _ = impostor.accept()
            sock.sendall(os.urandom(32))
            sock.recv(channel.HELLO_BYTES)
            sock.sendall(os.urandom(32))
            time.sleep(0.5)
            sock.close()

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(channel.ChannelError, match="does not hold this fit's key"):
            channel.connect(impostor.getsockname(), driver.key, channel.Hello(0, 1, 1), 2.0, 2.0)
    finally:
        impostor.close()


@pytest.mark.parametrize(
    "send",
    [b"", b"xyz", "é:1".encode(), b"\xff\xfe\xfd", struct.pack("<Q", 2**62), struct.pack("<Q", 200 << 20) + b"a" * 100],
    ids=["silent", "short garbage", "utf8 hello", "invalid utf8", "huge length", "200 MiB length then bytes"],
)
def test_bad_peers_are_dropped_without_stalling_the_listener(driver, caplog, send):
    with caplog.at_level(logging.WARNING, logger="spark_gmm"):
        bad = socket.create_connection(driver.address)
        assert len(bad.recv(32)) == 32  # the challenge
        bad.sendall(send)
        began = time.monotonic()
        good = driver.task()  # admitted while the bad peer is still in its handshake
        assert driver.arrived.wait(5) and driver.admitted[0][0].run == 1
        assert closed_by_peer(bad), "the bad connection was not closed"
        assert time.monotonic() - began < 3.0
        bad.close()
        good.close()
    assert "dropped a connection" in caplog.text


def test_a_task_of_another_run_is_not_admitted(driver):
    stale = driver.task(run=7)
    assert driver.arrived.wait(5)
    with pytest.raises(channel.ChannelError, match="closed"):
        stale.receive(10)


def test_a_message_above_the_expected_size_is_refused(driver):
    task = driver.task()
    assert driver.arrived.wait(5)
    _, link = driver.admitted[0]
    task.send(b"x" * 1000)
    with pytest.raises(channel.ChannelError, match="above the expected 999"):
        link.receive(999)



def channel_pair(session=None):
    """(raw socket of a task, the driver's Channel reading from it) over a socket pair."""
    raw_task, raw_driver = socket.socketpair()
    return raw_task, channel.Channel(raw_driver, session or os.urandom(32), b"D", 2.0)


def test_tampered_replayed_and_reflected_messages_are_refused():
    session = os.urandom(32)
    raw_task, receiver = channel_pair(session)
    channel.Channel(raw_task, session, b"T", 2.0).send(b"abc")
    frame = receiver.sock.recv(1000)
    raw_task.sendall(frame[:-1] + bytes([frame[-1] ^ 1]))  # one flipped bit: a forged message
    with pytest.raises(channel.ChannelError, match="integrity"):
        receiver.receive(10)
    raw_task, receiver = channel_pair(session)
    raw_task.sendall(frame)
    assert receiver.receive(10) == b"abc"
    raw_task.sendall(frame)  # the same message again
    with pytest.raises(channel.ChannelError, match="message 0 .* expected 1"):
        receiver.receive(10)
    raw_task, receiver = channel_pair(session)
    channel.Channel(raw_task, session, b"D", 2.0).send(b"abc")  # a driver's message sent back to it
    with pytest.raises(channel.ChannelError, match="integrity"):
        receiver.receive(10)
    raw_task, receiver = channel_pair()  # another connection's session
    raw_task.sendall(frame)
    with pytest.raises(channel.ChannelError, match="integrity"):
        receiver.receive(10)


def test_a_silent_sender_times_out_mid_message():
    raw_task, receiver = channel_pair()
    receiver.read_seconds = 0.3
    raw_task.sendall(struct.pack("<QQ", 0, 100) + b"partial")
    began = time.monotonic()
    with pytest.raises(channel.ChannelError, match="no data"):
        receiver.receive(1000)
    assert time.monotonic() - began < 2.0


def non_loopback_address():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_the_listener_binds_only_its_address(driver):
    host, port = driver.listener.server.getsockname()[:2]
    assert host == "127.0.0.1"
    other = non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback address")
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=2.0).close()
