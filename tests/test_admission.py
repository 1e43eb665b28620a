"""Unit tests: the admission policy, sweep timing, the new settings, in-conn handler
registration. No sockets."""

import ipaddress

import pytest

from aserver import App, Request
from aserver.conn.admission import (
    Admission,
    check_address,
    check_capacity,
    match_network,
    parse_networks,
    per_process_share,
)
from aserver.conn.sweeper import sweep_interval
from aserver.settings import LimitSettings, SettingsError, from_dict, from_toml_text


def nets(*texts: str) -> tuple:
    return parse_networks(texts)


def test_match_network_v4_v6_and_mapped() -> None:
    networks = nets("10.0.0.0/8", "2001:db8::/32")
    assert match_network("10.1.2.3", networks) == ipaddress.ip_network("10.0.0.0/8")
    assert match_network("2001:db8::1", networks) == ipaddress.ip_network("2001:db8::/32")
    assert match_network("::ffff:10.9.9.9", networks) == ipaddress.ip_network("10.0.0.0/8")  # dual-stack
    assert match_network("11.0.0.1", networks) is None
    assert match_network("not-an-ip", networks) is None


def test_deny_wins_over_allow_and_empty_allow_admits_all() -> None:
    allow, deny = nets("10.0.0.0/8"), nets("10.0.0.66/32")
    assert check_address("10.0.0.66", 0, allow=allow, deny=deny, max_per_ip=0).reason == "deny"
    assert check_address("10.0.0.67", 0, allow=allow, deny=deny, max_per_ip=0) is None
    assert check_address("192.168.0.1", 0, allow=allow, deny=deny, max_per_ip=0).reason == "allow"
    assert check_address("192.168.0.1", 0, allow=(), deny=deny, max_per_ip=0) is None
    refusal = check_address("10.0.0.66", 0, allow=allow, deny=deny, max_per_ip=0)
    assert "limits.deny (10.0.0.66/32)" in refusal.detail


def test_max_per_ip() -> None:
    assert check_address("1.2.3.4", 1, allow=(), deny=(), max_per_ip=2) is None
    refusal = check_address("1.2.3.4", 2, allow=(), deny=(), max_per_ip=2)
    assert refusal.reason == "max_per_ip" and "limits.max_per_ip (2)" in refusal.detail
    assert check_address("1.2.3.4", 10_000, allow=(), deny=(), max_per_ip=0) is None  # 0: unlimited


def test_capacity_is_a_share_of_the_total() -> None:
    assert per_process_share(10_000, 1) == 10_000
    assert per_process_share(10_000, 3) == 3334
    assert per_process_share(1, 4) == 1
    assert check_capacity(2, 3, 3) is None
    assert check_capacity(3, 3, 3).detail == "server.max_connections (3) reached"
    assert check_capacity(5, 5, 10).detail == "server.max_connections (10, 5 per conn process) reached"


def test_accept_hook_refuses_and_fails_closed() -> None:
    limits = LimitSettings(accept_hook="probe_service:admit")
    admission = Admission(limits, 100, 1)
    assert admission.by_address
    assert admission.address("127.0.0.1", 5000, 0) is None
    assert admission.address("127.0.0.4", 5000, 0).reason == "accept_hook"
    assert "raised" in admission.address("127.0.0.5", 5000, 0).detail  # a broken hook refuses


def test_no_address_rules_means_no_address_work() -> None:
    assert not Admission(LimitSettings(), 100, 2).by_address
    assert Admission(LimitSettings(), 100, 2).max_connections == 50


def test_sweep_interval() -> None:
    assert sweep_interval(0, 0, 0) == 0.0  # everything off: no sweep at all
    assert sweep_interval(60, 0, 5) == 1.0
    assert sweep_interval(0.6, 0, 0) == pytest.approx(0.15)
    assert sweep_interval(0.01) == 0.05


def test_new_settings_defaults_and_errors() -> None:
    settings = from_dict({})
    assert settings.limits.max_per_ip == 0 and settings.limits.allow == [] and settings.limits.idle_timeout == 0
    assert settings.proxy_protocol.enabled is False and settings.proxy_protocol.header_timeout == 5.0
    with pytest.raises(SettingsError) as info:
        from_toml_text(
            '[limits]\nmax_per_ip = -1\nallow = ["10.0.0.0/8", "bogus"]\ndeny = ["10.1.2.3/8"]\n'
            'accept_hook = "nocolon"\nidle_timeout = -2\npacket_timeout = "x"\nsurprise = 1\n'
            '[proxy_protocol]\nenabled = "yes"\ntrusted = ["300.1.1.1"]\nheader_timeout = 0\n'
        )
    text = str(info.value)
    for key in ("limits.max_per_ip", "limits.allow", "limits.deny", "limits.accept_hook", "limits.idle_timeout",
                "limits.packet_timeout", "limits.surprise", "proxy_protocol.enabled", "proxy_protocol.trusted",
                "proxy_protocol.header_timeout"):
        assert key in text, (key, text)
    assert "bogus" in text and "has host bits set" in text


def test_in_conn_handler_registration() -> None:
    app = App()

    @app.handler(1, in_conn=True)
    def ping(request: Request) -> bytes:
        return b"pong " + request.body

    assert app.conn_handlers == {1: ping}
    # The worker runs the same sync function when order requires it.
    assert app.handlers[1] is ping

    with pytest.raises(TypeError, match="sync"):

        @app.handler(2, in_conn=True)
        async def not_sync(request: Request) -> bytes:
            return b""

    with pytest.raises(ValueError, match="already has a handler"):
        app.handler(1, in_conn=True)(ping)

    merged = App()
    merged.include(app)
    assert merged.conn_handlers == {1: ping} and 1 in merged.handlers
