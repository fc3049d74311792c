"""Settings precedence and errors: defaults < file < environment < command line."""

from pathlib import Path

import pytest

from amqproxy.cli import main
from amqproxy.config import ConfigError, load, parse_upstream

INI = """
[main]
upstream = amqp://file-host:5672
idle_connection_timeout = 7
term_timeout = 11
log_level = warning

[listen]
bind = 10.0.0.1
port = 6000
http_port = 16000
"""


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "amqproxy.ini"
    path.write_text(INI)
    settings = load(str(path), {}, {})
    assert settings.upstream == "amqp://file-host:5672"
    assert (settings.listen_address, settings.listen_port, settings.http_port) == (
        "10.0.0.1",
        6000,
        16000,
    )
    assert settings.idle_connection_timeout == 7
    assert settings.max_upstream_channels == 0  # default
    env = {"LISTEN_PORT": "6001", "IDLE_CONNECTION_TIMEOUT": "8", "AMQP_URL": "amqp://env:1"}
    settings = load(str(path), env, {})
    assert (settings.listen_port, settings.idle_connection_timeout) == (6001, 8)
    assert settings.upstream == "amqp://env:1"
    assert settings.term_timeout == 11  # file still wins over the default
    settings = load(str(path), env, {"listen_port": "6002", "upstream": "amqps://cli"})
    assert settings.listen_port == 6002 and settings.idle_connection_timeout == 8
    assert settings.upstream_tls and settings.upstream_port == 5671


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(None, {"LISTEN_PORT": "http"}, {"upstream": "amqp://h"})
    assert err.value.key == "LISTEN_PORT"
    path = tmp_path / "bad.ini"
    path.write_text("[main]\nupstream = amqp://h\nmax_upstream_channels = -3\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), {}, {})
    assert err.value.key == "[main] max_upstream_channels"
    path.write_text("[main]\nupstream = amqp://h\nbogus = 1\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), {}, {})
    assert err.value.key == "[main] bogus"


def test_cli_reports_a_bad_setting_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "99999", "amqp://h"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-p/--port" in err[0] and "99999" in err[0]


def test_one_table_makes_the_flags_the_environment_and_the_file() -> None:
    """Every setting of config.OPTIONS can be given each way it declares, and the three agree."""
    from amqproxy.cli import build_parser, settings_from
    from amqproxy.config import OPTIONS

    parser = build_parser()
    known = {flag for action in parser._actions for flag in action.option_strings}
    for option in OPTIONS:
        assert set(option.flags) <= known, option.key
    samples = {"upstream": "amqp://h:1", "listen_address": "0.0.0.0", "log_level": "warning",
               "upstream_heartbeat": "broker", "park_channels": "false",
               "split_consumers": "false",
               "upstream_ca": __file__, "log_format": "json"}  # fmt: skip
    for option in OPTIONS:
        text = samples.get(option.key, "7")
        value = option.parse(text)
        if option.env:
            env = {"AMQP_URL": "amqp://h", option.env: text}  # the URL is needed; its own wins
            assert getattr(load(None, env, {}), option.key) == value, option.key
        if option.flags:
            argv = [option.flags[-1]] if option.const else [option.flags[-1], text]
            got, _ = settings_from([*argv, "amqp://h"] if option.key != "upstream" else argv)
            if option.const is None or option.parse(option.const) == value:
                assert getattr(got, option.key) == value, option.key


def test_upstream_url() -> None:
    assert parse_upstream("amqp://broker") == ("broker", 5672, False, [])
    assert parse_upstream("amqps://broker:5999") == ("broker", 5999, True, [])
    assert parse_upstream("amqp://u:p@broker/vh")[3] == ["credentials", "vhost"]
    with pytest.raises(ValueError):
        parse_upstream("http://broker")


def test_print_config_hides_url_credentials_and_warns_as_a_start_would(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    assert main(["--print-config", "amqp://bob:secret@broker:5672/vh"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["upstream"] == "amqp://broker:5672/vh"
    assert "secret" not in out + err
    assert "warning: the upstream URL's credentials and vhost are ignored" in err


def test_an_unreadable_ca_file_exits_2_naming_the_setting_and_the_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    assert main(["--upstream-ca", str(missing), "amqps://broker"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--upstream-ca" in err[0] and str(missing) in err[0]


def test_channel_max_is_accepted_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "amqproxy.ini"
    config.write_text("[main]\nupstream = amqp://broker\nchannel_max = 100\n")
    assert load(str(config), {}, {}).channel_max == 100


def test_a_taken_http_port_names_the_http_port_before_amqp_listens(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            amqp_port = free.getsockname()[1]
        argv = [sys.executable, "-m", "amqproxy", "-l", "127.0.0.1", "-p", str(amqp_port),
                "-b", str(port), "amqp://127.0.0.1:5672"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"cannot listen for HTTP on port {port} (-b/--http-port)" in done.stderr
    assert "listening on" not in done.stderr
