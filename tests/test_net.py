"""This host's address in a job: ``host:port`` parsing, wildcards, loopback, the route to the coordinator,
the ``SPMD_HOST_ADDRESS`` opt-in for wildcards, gloo's address, and where the host-level mesh listens.

The two-host behaviour itself (gloo and the host-level connections across network namespaces) is
in tests/test_two_hosts.py.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from test_host_net import Job

from spmd import compat, distributed, net
from spmd.envs import SpmdEnv
from spmd.host_net import NetConfig, PeerConnections, _peers


@pytest.mark.parametrize(
    "address,expect",
    [
        ("10.0.0.1:29500", ("10.0.0.1", 29500)),
        ("node-7.cluster:1", ("node-7.cluster", 1)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
        ("[::ffff:10.0.0.1]:80", ("::ffff:10.0.0.1", 80)),
    ],
)
def test_split_host_port(address, expect):
    assert net.split_host_port(address) == expect


@pytest.mark.parametrize(
    "address,match",
    [
        ("10.0.0.1", r"--coordinator: expected HOST:PORT .* got '10.0.0.1'"),
        ("127.0.0.1:notaport", r"the port must be an integer from 1 to 65535, got 'notaport'"),
        ("127.0.0.1:0", r"from 1 to 65535, got '0'"),
        ("127.0.0.1:65536", r"from 1 to 65535, got '65536'"),
        ("127.0.0.1:-1", r"from 1 to 65535, got '-1'"),
        ("127.0.0.1: 80", r"from 1 to 65535, got ' 80'"),
        ("127.0.0.1:", r"from 1 to 65535, got ''"),
        ("127.0.0.1:٣", r"from 1 to 65535"),  # a non-ASCII digit int() would take
        (":80", r"expected HOST:PORT with a host before the ':'"),
        ("::1:80", r"an IPv6 host goes in brackets, as \[::1\]:80"),
    ],
)
def test_split_host_port_refuses_with_what_was_given(address, match):
    with pytest.raises(ValueError, match=match):
        net.split_host_port(address, what="--coordinator")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "::ffff:0.0.0.0", "0:0:0:0:0:ffff:0:0", "0", "*", ""])
def test_wildcards(host):
    assert net.is_wildcard(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "::1", "::ffff:10.0.0.1", "127.0.0.1", "node-7"])
def test_not_wildcards(host):
    assert not net.is_wildcard(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "::ffff:127.0.0.1", "localhost"])
def test_loopback(host):
    assert net.is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "::ffff:10.0.0.1", "fe80::1", "0.0.0.0"])
def test_not_loopback(host):
    assert not net.is_loopback(host)


def _resolving(monkeypatch, table: dict[str, list[str]]) -> None:
    """Make ``socket.getaddrinfo`` answer host names from ``table`` (addresses go through unchanged)."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in table:
            if not table[host]:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            fam = lambda a: socket.AF_INET6 if ":" in a else socket.AF_INET
            return [(fam(a), socket.SOCK_STREAM, 6, "", (a, port or 0)) for a in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_is_loopback_only_when_every_address_is(monkeypatch):
    _resolving(monkeypatch, {"deb": ["127.0.1.1"], "both": ["127.0.1.1", "10.1.2.3"], "gone": []})
    assert net.is_loopback("deb")  # Debian's "127.0.1.1 hostname" line
    assert not net.is_loopback("both")
    assert not net.is_loopback("gone")


def test_route_address():
    assert net.route_address("127.0.0.1", 9) == "127.0.0.1"  # nothing is sent: port 9 need not listen
    assert net.route_address("no-such-host.invalid", 9) is None


def test_one_host_jobs_stay_on_loopback():
    assert net.host_address(None) is None
    assert net.host_address("127.0.0.1:1234") is None
    assert net.host_address("localhost:1234") is None
    assert net.host_address("[::1]:1234") is None
    mine = net.host_address("127.0.0.1:1234", "10.1.2.3")  # SPMD_HOST_ADDRESS on one host: as before
    assert (mine.bind, mine.advertise) == ("10.1.2.3", "10.1.2.3")
    wild = net.host_address("127.0.0.1:1234", "0.0.0.0")  # an allowed wildcard: listen there, dial loopback
    assert (wild.bind, wild.advertise) == ("0.0.0.0", "127.0.0.1")


def test_across_hosts_the_route_to_the_coordinator_is_the_address(monkeypatch):
    seen = []
    monkeypatch.setattr(net, "route_address", lambda host, port: seen.append((host, port)) or "10.77.0.2")
    got = net.host_address("10.77.0.1:29500")
    assert seen == [("10.77.0.1", 29500)]
    assert (got.bind, got.advertise) == ("10.77.0.2", "10.77.0.2") and "route to the coordinator" in got.source
    got = net.host_address("10.77.0.1:29500", "::")  # an allowed wildcard: listen on every interface
    assert (got.bind, got.advertise) == ("::", "10.77.0.2")
    got = net.host_address("10.77.0.1:29500", "10.9.9.9")  # SPMD_HOST_ADDRESS wins, no route asked
    assert (got.bind, got.advertise, got.source) == ("10.9.9.9", "10.9.9.9", "SPMD_HOST_ADDRESS")
    assert len(seen) == 2


def test_without_a_route_the_hostname_is_the_address(monkeypatch):
    monkeypatch.setattr(net, "route_address", lambda host, port: None)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    _resolving(monkeypatch, {"node-b": ["10.5.5.5"]})
    got = net.host_address("10.77.0.1:29500")
    assert got.advertise == "node-b" and "this host's name" in got.source


@pytest.mark.parametrize(
    "configured,route,hostname,match",
    [
        ("127.0.0.1", None, "x", r"'127.0.0.1' \(SPMD_HOST_ADDRESS\), a loopback address, but the coordinator"),
        (None, None, "deb", r"'deb' \(this host's name .*\), a loopback address, but the coordinator 10.77.0.1:29500"),
        (None, "127.0.0.1", "x", r"'127.0.0.1' \(the local address of the route .*\), a loopback address"),
    ],
)
def test_a_loopback_address_with_a_remote_coordinator_is_an_error(monkeypatch, configured, route, hostname, match):
    monkeypatch.setattr(net, "route_address", lambda host, port: route)
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    _resolving(monkeypatch, {"deb": ["127.0.1.1"]})
    with pytest.raises(ValueError, match=match + r".*Set SPMD_HOST_ADDRESS"):
        net.host_address("10.77.0.1:29500", configured)


# SPMD_HOST_ADDRESS: wildcards only when allowed (issue 22, item 3) ----------------------------------


@pytest.mark.parametrize("raw", ["0.0.0.0", "::", "[::]", "::ffff:0.0.0.0", "[::ffff:0.0.0.0]", "0"])
def test_a_wildcard_host_address_is_refused_unless_allowed(raw):
    with pytest.raises(
        ValueError, match=rf"SPMD_HOST_ADDRESS={re.escape(repr(raw))}: .* not a wildcard.*SPMD_ALLOW_WILDCARD_HOST"
    ):
        SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": raw})
    allowed = SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": raw, "SPMD_ALLOW_WILDCARD_HOST_ADDRESS": "1"})
    assert allowed.host_address == raw.strip("[]")


def test_star_is_never_an_address_and_the_opt_in_is_checked():
    with pytest.raises(ValueError, match=r"SPMD_HOST_ADDRESS='\*'"):
        SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": "*", "SPMD_ALLOW_WILDCARD_HOST_ADDRESS": "yes"})
    with pytest.raises(ValueError, match=r"SPMD_ALLOW_WILDCARD_HOST_ADDRESS='maybe': expected 1 or 0"):
        SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": "0.0.0.0", "SPMD_ALLOW_WILDCARD_HOST_ADDRESS": "maybe"})
    with pytest.raises(ValueError, match="not a wildcard"):
        SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": "::", "SPMD_ALLOW_WILDCARD_HOST_ADDRESS": "0"})


def test_host_env_rereads_the_opt_in(monkeypatch):
    from spmd.envs import host_env

    monkeypatch.setenv("SPMD_HOST_ADDRESS", "0.0.0.0")
    monkeypatch.delenv("SPMD_ALLOW_WILDCARD_HOST_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="not a wildcard"):
        host_env()
    monkeypatch.setenv("SPMD_ALLOW_WILDCARD_HOST_ADDRESS", "1")
    assert host_env().host_address == "0.0.0.0"


# Where the host-level connections listen ------------------------------------------------------------


def test_a_mesh_listens_on_its_bind_address_and_publishes_the_reachable_one(monkeypatch):
    mesh = PeerConnections(None, 1, 2, NetConfig("auto", "127.0.0.1", "0.0.0.0"))
    published = {}
    monkeypatch.setattr(
        mesh, "client", type("KV", (), {"key_value_set_bytes": lambda s, k, v, **kw: published.update({k: v})})()
    )
    mesh._publish()
    try:
        assert mesh._listener.getsockname()[0] == "0.0.0.0"
        assert b'"host": "127.0.0.1"' in published["spmd/host_net/1"]
    finally:
        mesh.close()


def test_two_machines_with_addresses_connect_directly(monkeypatch):
    monkeypatch.setattr(_peers, "machine", lambda: threading.current_thread().name)  # p0, p1: two "machines"
    job = Job(2, connect=False)
    job.meshes = [PeerConnections(job.kv, p, 2, NetConfig("auto", "127.0.0.1", "0.0.0.0")) for p in range(2)]
    try:
        assert job.each(lambda m, c: m.ready(c), op="setup") == [True, True]
        assert job.bcast([{"x": 1}, None], 0) == [{"x": 1}, {"x": 1}]
    finally:
        job.close()


def test_the_host_level_connections_get_the_job_address(monkeypatch):
    from spmd import host

    monkeypatch.setattr(compat, "coordinator_address", lambda: "10.77.0.1:29500")
    monkeypatch.setattr(net, "route_address", lambda h, p: "10.77.0.2")
    peers = host._Peers()
    m = peers.get(object(), 1, 2, SpmdEnv())
    assert (m.config.address, m.config.bind) == ("10.77.0.2", "10.77.0.2")
    m = peers.get(object(), 1, 2, SpmdEnv(host_address="0.0.0.0"))
    assert (m.config.address, m.config.bind) == ("10.77.0.2", "0.0.0.0")
    monkeypatch.setattr(compat, "coordinator_address", lambda: "127.0.0.1:29500")
    m = peers.get(object(), 1, 2, SpmdEnv())
    assert (m.config.address, m.config.bind) == (None, None)  # one host: loopback


# gloo's address (issue 23, item 1) ------------------------------------------------------------------


def test_gloo_is_built_with_the_given_address(monkeypatch):
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    factories, built = {}, []
    monkeypatch.setattr(xla_bridge, "register_backend_factory", lambda name, f, **kw: factories.update({name: f}))
    monkeypatch.setattr(xla_bridge, "make_cpu_client", lambda collectives=None: ("cpu client", collectives))
    monkeypatch.setattr(_jax, "make_gloo_tcp_collectives", lambda **kw: built.append(kw) or "gloo", raising=False)
    assert compat.gloo_on_address("10.77.0.2")
    monkeypatch.setattr(jax_distributed.global_state, "client", None)
    assert factories["cpu"]() == ("cpu client", None)  # outside a job: JAX's own client
    monkeypatch.setattr(jax_distributed.global_state, "client", "the job's client")
    assert factories["cpu"]() == ("cpu client", "gloo")
    assert built == [{"distributed_client": "the job's client", "hostname": "10.77.0.2"}]


def test_gloo_address_after_the_backend_started_is_a_no_op():
    assert not compat.gloo_on_address("10.77.0.2")  # this test process's CPU backend is running


def test_init_gives_gloo_the_address_and_refuses_loopback_before_joining(monkeypatch):
    joined, gloo = [], []
    monkeypatch.setattr(distributed._Joined, "done", False)
    monkeypatch.setattr(compat, "backends_started", lambda: False)
    monkeypatch.setattr(compat, "gloo_on_address", lambda host: gloo.append(host) or True)
    monkeypatch.setattr(compat, "coordinator_address", lambda: None)
    monkeypatch.setattr(distributed, "_cuda_possible", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: joined.append(kw))
    monkeypatch.setattr(net, "route_address", lambda h, p: "10.77.0.2")
    waited = []
    monkeypatch.setattr(net, "wait_until_listening", lambda h, p, t: waited.append((h, p, t)))
    monkeypatch.delenv("SPMD_HOST_ADDRESS", raising=False)
    distributed.init_distributed_environment("10.77.0.1:29500", 2, 1, timeout_s=30)
    assert gloo == ["10.77.0.2"] and "coordinator_bind_address" not in joined[0]
    assert waited == [("10.77.0.1", 29500, 30)]  # process 1 waited for the coordinator first

    monkeypatch.setattr(distributed._Joined, "done", False)
    distributed.init_distributed_environment("127.0.0.1:29500", 2, 1)
    assert gloo[-1] == "127.0.0.1" and joined[-1]["coordinator_bind_address"] == "127.0.0.1:29500"

    monkeypatch.setattr(distributed._Joined, "done", False)
    monkeypatch.setenv("SPMD_HOST_ADDRESS", "127.0.0.1")
    with pytest.raises(ValueError, match=r"'127.0.0.1' \(SPMD_HOST_ADDRESS\), a loopback address, but the coordin"):
        distributed.init_distributed_environment("10.77.0.1:29500", 2, 1)
    assert len(joined) == 2 and not distributed.distributed_is_initialized()  # refused before joining


def test_wait_until_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        last = net.wait_until_listening("127.0.0.1", port, 0.3)  # bound, not listening: refused
        assert "ConnectionRefusedError" in last and 0.3 <= time.monotonic() - t0 < 2
        s.listen()
        assert net.wait_until_listening("127.0.0.1", port, 5) is None


def test_a_coordinator_that_never_comes_is_a_clear_error_not_an_abort(monkeypatch):
    joined = []
    monkeypatch.setattr(distributed._Joined, "done", False)
    monkeypatch.setattr(compat, "backends_started", lambda: False)
    monkeypatch.setattr(distributed, "_cuda_possible", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: joined.append(kw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # nothing listens there
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=rf"coordination service at {address} .* did not accept connections "
                           r"within 1 s \(last: ConnectionRefusedError.*Start process 0"):  # fmt: skip
            distributed.init_distributed_environment(address, 2, 1, timeout_s=1)
    assert joined == [] and not distributed.distributed_is_initialized()
