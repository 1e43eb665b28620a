"""settings.toml loading and validation (aserver.settings)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aserver.ipc.ring import max_payload
from aserver.protocol import ByteOrder
from aserver.settings import Settings, SettingsError, from_dict, from_toml_text, load

SHIPPED = Path(__file__).resolve().parent.parent / "settings.toml"


def problems_of(text: str) -> str:
    with pytest.raises(SettingsError) as info:
        from_toml_text(text)
    return str(info.value)


def names_key(message: str, key: str) -> bool:
    """True if some line of the message reports a problem with exactly `key`."""
    return any(
        f": {key}{end}" in line or line.startswith(f"{key}{end}")
        for line in message.splitlines()
        for end in (": ", "[")  # "workers.handlers[0]: ..." names workers.handlers
    )


# -- defaults and the shipped file ------------------------------------------------------


def test_defaults_from_empty_text():
    s = from_toml_text("")
    assert isinstance(s, Settings)
    assert s == Settings()
    assert s.server.bind == "127.0.0.1:7000"
    assert s.bind_address == ("127.0.0.1", 7000)
    assert s.byte_order is ByteOrder.LITTLE
    assert s.workers.count >= 1
    assert s.workers.routing == "connection"
    # the defaults are themselves consistent: a maximum packet fits in one ring record
    assert max_payload(s.ring.size) >= s.server.max_packet_size


def test_empty_sections_are_defaults():
    assert from_toml_text("[server]\n[workers]\n[ring]\n") == Settings()


def test_shipped_settings_every_key_loads():
    raw = tomllib.loads(SHIPPED.read_text())
    assert raw, "settings.toml is empty"
    s = load(SHIPPED)
    assert s == from_toml_text(SHIPPED.read_text())
    checked = 0
    for section, values in raw.items():
        assert isinstance(values, dict), section
        loaded = getattr(s, section)
        for key, value in values.items():
            got = loaded[key] if isinstance(loaded, dict) else getattr(loaded, key)
            assert got == value, f"{section}.{key}"
            checked += 1
    assert checked >= 5


def test_every_key_of_shipped_file_alone():
    """Each key of the shipped file is accepted on its own (with defaults elsewhere)."""
    raw = tomllib.loads(SHIPPED.read_text())
    for section, values in raw.items():
        for key, value in values.items():
            s = from_dict({section: {key: value}})
            loaded = getattr(s, section)
            got = loaded[key] if isinstance(loaded, dict) else getattr(loaded, key)
            assert got == value, f"{section}.{key}"


def test_network_byte_order_and_v6_bind():
    s = from_toml_text('[server]\nbyte_order = "network"\nbind = "[::1]:7001"\n')
    assert s.byte_order is ByteOrder.NETWORK
    assert s.bind_address == ("::1", 7001)


# -- one problem, named ---------------------------------------------------------------------


def test_unknown_key():
    message = problems_of("[server]\nbogus = 1\n")
    assert names_key(message, "server.bogus")
    assert "unknown key" in message


def test_unknown_key_in_each_section():
    for section in ("server", "workers", "ring"):
        message = problems_of(f"[{section}]\nnot_a_key = 1\n")
        assert names_key(message, f"{section}.not_a_key"), message


def test_unknown_section():
    message = problems_of("[bogus]\nx = 1\n")
    assert names_key(message, "bogus")
    assert "unknown section" in message


def test_section_that_is_not_a_table():
    message = problems_of("workers = 3\n")
    assert names_key(message, "workers")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[workers]\ncount = "two"', "workers.count"),
        ("[workers]\ncount = true", "workers.count"),
        ("[workers]\ncount = 2.5", "workers.count"),
        ('[workers]\nhandlers = "handlers.echo"', "workers.handlers"),
        ("[workers]\nhandlers = [1, 2]", "workers.handlers"),
        ("[server]\nbind = 7000", "server.bind"),
        ('[server]\nmax_packet_size = "1M"', "server.max_packet_size"),
        ('[server]\nbyte_order = "big"', "server.byte_order"),
        ('[server]\nlog_level = "LOUD"', "server.log_level"),
        ('[server]\nstop_timeout = "10s"', "server.stop_timeout"),
        ('[ring]\nsize = "8M"', "ring.size"),
    ],
)
def test_wrong_type_or_value_names_key(text, key):
    message = problems_of(text)
    assert names_key(message, key), message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[workers]\ncount = 0", "workers.count"),
        ("[workers]\ncount = -1", "workers.count"),
        ("[workers]\nhandlers = []", "workers.handlers"),
        ("[server]\nmax_packet_size = 17", "server.max_packet_size"),
        ("[server]\nmax_connections = 0", "server.max_connections"),
        ("[server]\nbacklog = 70000", "server.backlog"),
        ("[server]\nstop_timeout = 0", "server.stop_timeout"),
        ("[server]\nmax_reply_backlog = 10000000000000000000", "server.max_reply_backlog"),
        ('[server]\nname = ""', "server.name"),
        ("[ring]\nsize = 1024", "ring.size"),
    ],
)
def test_out_of_range_names_key(text, key):
    message = problems_of(text)
    assert names_key(message, key), message


def test_out_of_range_message_says_why():
    message = problems_of("[workers]\ncount = 0\n")
    assert "workers.count: Expected `int` >= 1" in message


@pytest.mark.parametrize(
    "bind",
    [
        "nonsense",
        "127.0.0.1",
        ":7000",
        "127.0.0.1:",
        "127.0.0.1:abc",
        "127.0.0.1:70000",
        "127.0.0.1:-1",
        "not a host:7000",
        "300.1.1.1:7000",
        "[::1]",
    ],
)
def test_bad_bind(bind):
    message = problems_of(f'[server]\nbind = "{bind}"\n')
    assert names_key(message, "server.bind"), message


@pytest.mark.parametrize(
    ("bind", "address"),
    [("0.0.0.0:0", ("0.0.0.0", 0)), ("localhost:65535", ("localhost", 65535)), ("[::]:80", ("::", 80))],
)
def test_good_bind(bind, address):
    assert from_toml_text(f'[server]\nbind = "{bind}"\n').bind_address == address


def test_bad_routing():
    message = problems_of('[workers]\nrouting = "random"\n')
    assert names_key(message, "workers.routing")
    assert from_toml_text('[workers]\nrouting = "user_id"').workers.routing == "user_id"
    assert from_toml_text('[workers]\nrouting = "mymod:pick"').workers.routing == "mymod:pick"


def test_ring_too_small_for_max_packet_size():
    message = problems_of("[ring]\nsize = 65536\n")  # default max_packet_size is 1 MiB
    assert names_key(message, "ring.size"), message
    assert "max_packet_size" in message


def test_ring_size_boundary():
    # 4 * (max_packet_size + 64) bytes is just enough
    ok = from_toml_text("[server]\nmax_packet_size = 16320\n[ring]\nsize = 65536\n")
    assert ok.ring.size == 65536
    message = problems_of("[server]\nmax_packet_size = 16321\n[ring]\nsize = 65536\n")
    assert names_key(message, "ring.size"), message


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    packet=st.integers(18, 200_000),
    size=st.integers(64 * 1024, 1024 * 1024),
)
def test_accepted_ring_holds_a_maximum_packet(packet, size):
    """Whenever settings are accepted, one maximum-size packet fits in one ring record
    (otherwise a conn process could never forward it)."""
    try:
        s = from_dict({"server": {"max_packet_size": packet}, "ring": {"size": size}})
    except SettingsError as exc:
        assert names_key(str(exc), "ring.size"), str(exc)
        return
    assert max_payload((s.ring.size + 7) & ~7) >= s.server.max_packet_size


def test_invalid_toml():
    with pytest.raises(SettingsError) as info:
        from_toml_text("[server\nbind = ", source="my.toml")
    assert "my.toml" in str(info.value)
    assert "TOML" in str(info.value)


# -- many problems at once --------------------------------------------------------------------


def test_all_problems_reported():
    text = """
[server]
bogus = 1
max_connections = 0
byte_order = "sideways"

[workers]
count = "many"
extra = true

[ring]
size = 10

[nope]
a = 1
"""
    message = problems_of(text)
    for key in (
        "server.bogus",
        "server.max_connections",
        "server.byte_order",
        "workers.count",
        "workers.extra",
        "ring.size",
        "nope",
    ):
        assert names_key(message, key), f"{key} missing from:\n{message}"
    assert len(message.splitlines()) >= 7


def test_bad_bind_reported_with_other_problems():
    message = problems_of('[server]\nbind = "nowhere"\nbogus = 1\n[workers]\ncount = 0\n')
    for key in ("server.bind", "server.bogus", "workers.count"):
        assert names_key(message, key), f"{key} missing from:\n{message}"


def test_ring_too_small_reported_with_other_problems():
    """The ring/max_packet_size rule involves two keys that are each valid, so it can be
    checked (and must be reported) even when some other key is wrong."""
    message = problems_of("[server]\nbogus = 1\n[ring]\nsize = 65536\n")
    for key in ("server.bogus", "ring.size"):
        assert names_key(message, key), f"{key} missing from:\n{message}"


# -- load() and overrides ---------------------------------------------------------------------


def test_load_with_overrides(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[server]\nbind = "127.0.0.1:7000"\n[workers]\ncount = 2\n')
    s = load(path, {"server.bind": "127.0.0.1:9001", "workers.count": 4, "ring.size": 16 * 1024 * 1024})
    assert s.bind_address == ("127.0.0.1", 9001)
    assert s.workers.count == 4
    assert s.ring.size == 16 * 1024 * 1024  # a section absent from the file
    # untouched keys keep the file's or default values
    assert s.server.max_packet_size == Settings().server.max_packet_size
    assert load(path).workers.count == 2
    assert load(path, {}).bind_address == ("127.0.0.1", 7000)


def test_bad_override_names_key(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("")
    with pytest.raises(SettingsError) as info:
        load(path, {"workers.count": 0, "server.bind": "nope"})
    message = str(info.value)
    assert names_key(message, "workers.count"), message
    assert names_key(message, "server.bind"), message
    assert str(path) in message


def test_override_fixes_bad_file_value(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[workers]\ncount = 0\n")
    with pytest.raises(SettingsError):
        load(path)
    assert load(path, {"workers.count": 3}).workers.count == 3


def test_override_into_section_that_is_not_a_table(tmp_path):
    """`server = 3` plus --bind must be a SettingsError naming the section, not a
    TypeError traceback."""
    path = tmp_path / "s.toml"
    path.write_text("server = 3\n")
    with pytest.raises(SettingsError) as info:
        load(path, {"server.bind": "127.0.0.1:9000"})
    assert "server" in str(info.value)


def test_load_missing_and_invalid_file(tmp_path):
    with pytest.raises(SettingsError) as info:
        load(tmp_path / "absent.toml")
    assert "absent.toml" in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nbind = \n")
    with pytest.raises(SettingsError) as info:
        load(bad)
    assert "bad.toml" in str(info.value)


# -- never a traceback ------------------------------------------------------------------------

_FIELDS = {
    f.encode_name: [g.encode_name for g in msgspec.structs.fields(f.type)]
    for f in msgspec.structs.fields(Settings)
    if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
}
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["127.0.0.1:0", "little", "network", "INFO", "connection", "x:y"]),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_sections = st.sampled_from([*_FIELDS, "bogus"])


@st.composite
def _raw_settings(draw):
    raw = {}
    for section in draw(st.lists(_sections, max_size=4, unique=True)):
        keys = [*_FIELDS.get(section, []), "bogus_key"]
        raw[section] = draw(st.dictionaries(st.sampled_from(keys), _values, max_size=4))
    return raw


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_raw_settings())
def test_arbitrary_input_loads_or_names_keys(raw):
    """Any table either loads or raises SettingsError whose every line names a section
    or key that is actually in the input; nothing else escapes."""
    try:
        s = from_dict(raw)
    except SettingsError as exc:
        lines = str(exc).splitlines()
        assert lines
        present = set(raw) | {f"{sec}.{key}" for sec, vals in raw.items() for key in vals}
        # cross-key rules may name a key left at its default, but still a real key
        known = present | {f"{sec}.{key}" for sec, keys in _FIELDS.items() for key in keys}
        for line in lines:
            assert line.startswith("settings: "), line
            named = line[len("settings: ") :].split(": ", 1)[0].split("[", 1)[0]
            assert named in known, line
    else:
        assert isinstance(s, Settings)
