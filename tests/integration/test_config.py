"""Configuration: defaults < file < environment < command line (checked with --print-config and
by really starting the proxy); bad configuration is one line naming the key, no traceback;
credentials in the upstream URL are ignored with a warning."""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid

import pytest
from support import (
    BROKER_URL,
    Proxy,
    drain,
    free_port,
    list_connections,
    run_proxy_cli,
)


def _print_config(args, env=None) -> dict:
    res = run_proxy_cli([*args, "--print-config"], env=env)
    assert res.returncode == 0, f"rc={res.returncode}\nstdout:{res.stdout}\nstderr:{res.stderr}"
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"--print-config did not print JSON: {res.stdout!r}") from exc


def _write_ini(tmp_path, text: str):
    path = tmp_path / f"amqproxy-{uuid.uuid4().hex[:6]}.ini"
    path.write_text(textwrap.dedent(text))
    return path


FILE_INI = """\
    [main]
    upstream = amqp://file-host:1111
    log_level = warning
    idle_connection_timeout = 11
    max_upstream_channels = 111
    term_timeout = 12
    term_client_close_timeout = 13

    [listen]
    address = 127.0.0.2
    port = 6001
    http_port = 6002
    """


def _num(v) -> float:
    return float(v)


@pytest.mark.timeout(30)
def test_defaults():
    cfg = _print_config([BROKER_URL])
    expected_keys = {
        "upstream",
        "listen_address",
        "listen_port",
        "http_port",
        "log_level",
        "idle_connection_timeout",
        "max_upstream_channels",
        "term_timeout",
        "term_client_close_timeout",
    }
    assert expected_keys <= set(cfg), f"missing keys: {expected_keys - set(cfg)}"
    assert _num(cfg["idle_connection_timeout"]) == 5
    assert int(cfg["http_port"]) == 15673
    assert "127.0.0.1" in str(cfg["upstream"]) and "5672" in str(cfg["upstream"])


@pytest.mark.timeout(30)
def test_file_values_apply(tmp_path):
    ini = _write_ini(tmp_path, FILE_INI)
    cfg = _print_config(["-c", str(ini)])
    assert "file-host" in str(cfg["upstream"]) and "1111" in str(cfg["upstream"])
    assert str(cfg["log_level"]).lower() == "warning"
    assert _num(cfg["idle_connection_timeout"]) == 11
    assert int(cfg["max_upstream_channels"]) == 111
    assert _num(cfg["term_timeout"]) == 12
    assert _num(cfg["term_client_close_timeout"]) == 13
    assert cfg["listen_address"] == "127.0.0.2"
    assert int(cfg["listen_port"]) == 6001
    assert int(cfg["http_port"]) == 6002


@pytest.mark.timeout(30)
def test_environment_overrides_file(tmp_path):
    ini = _write_ini(tmp_path, FILE_INI)
    env = {
        "AMQP_URL": "amqp://env-host:2222",
        "LISTEN_ADDRESS": "127.0.0.3",
        "LISTEN_PORT": "7001",
        "HTTP_PORT": "7002",
        "LOG_LEVEL": "error",
        "IDLE_CONNECTION_TIMEOUT": "21",
        "MAX_UPSTREAM_CHANNELS": "221",
        "TERM_TIMEOUT": "22",
        "TERM_CLIENT_CLOSE_TIMEOUT": "23",
    }
    cfg = _print_config(["-c", str(ini)], env=env)
    assert "env-host" in str(cfg["upstream"]) and "2222" in str(cfg["upstream"])
    assert cfg["listen_address"] == "127.0.0.3"
    assert int(cfg["listen_port"]) == 7001
    assert int(cfg["http_port"]) == 7002
    assert str(cfg["log_level"]).lower() == "error"
    assert _num(cfg["idle_connection_timeout"]) == 21
    assert int(cfg["max_upstream_channels"]) == 221
    assert _num(cfg["term_timeout"]) == 22
    assert _num(cfg["term_client_close_timeout"]) == 23


@pytest.mark.timeout(30)
def test_command_line_overrides_environment_and_file(tmp_path):
    ini = _write_ini(tmp_path, FILE_INI)
    env = {
        "AMQP_URL": "amqp://env-host:2222",
        "LISTEN_PORT": "7001",
        "IDLE_CONNECTION_TIMEOUT": "21",
        "TERM_TIMEOUT": "22",
        "LOG_LEVEL": "error",
    }
    cfg = _print_config(
        [
            "-c",
            str(ini),
            "-l",
            "127.0.0.4",
            "-p",
            "8001",
            "-b",
            "8002",
            "-t",
            "31",
            "--max-upstream-channels",
            "331",
            "--term-client-close-timeout",
            "33",
            "-d",
            "amqp://cli-host:3333",
        ],
        env=env,
    )
    # command line
    assert "cli-host" in str(cfg["upstream"]) and "3333" in str(cfg["upstream"])
    assert cfg["listen_address"] == "127.0.0.4"
    assert int(cfg["listen_port"]) == 8001
    assert int(cfg["http_port"]) == 8002
    assert _num(cfg["idle_connection_timeout"]) == 31
    assert int(cfg["max_upstream_channels"]) == 331
    assert _num(cfg["term_client_close_timeout"]) == 33
    assert str(cfg["log_level"]).lower() == "debug"
    # environment (not on the command line)
    assert _num(cfg["term_timeout"]) == 22


@pytest.mark.timeout(30)
def test_long_options_and_bind_alias(tmp_path):
    ini = _write_ini(
        tmp_path,
        """\
        [main]
        upstream = amqp://file-host:1111
        [listen]
        bind = 127.0.0.5
        """,
    )
    cfg = _print_config(["-c", str(ini)])
    assert cfg["listen_address"] == "127.0.0.5"
    cfg = _print_config(
        [
            "-c",
            str(ini),
            "--listen",
            "127.0.0.6",
            "--port",
            "9001",
            "--http-port",
            "9002",
            "--idle-connection-timeout",
            "41",
            "--term-timeout",
            "42",
            "--debug",
        ]
    )
    assert cfg["listen_address"] == "127.0.0.6"
    assert int(cfg["listen_port"]) == 9001
    assert int(cfg["http_port"]) == 9002
    assert _num(cfg["idle_connection_timeout"]) == 41
    assert _num(cfg["term_timeout"]) == 42
    assert str(cfg["log_level"]).lower() == "debug"


def _assert_one_line_error(res: subprocess.CompletedProcess, *names: str) -> None:
    out = res.stderr
    assert res.returncode != 0, f"accepted bad config (rc 0)\nstdout:{res.stdout}\nstderr:{out}"
    assert "Traceback" not in out and "Traceback" not in res.stdout, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{out}"
    assert any(n.lower() in lines[0].lower() for n in names), (
        f"error does not name {names}: {lines[0]!r}"
    )


def _start_args() -> list[str]:
    return ["-l", "127.0.0.1", "-p", str(free_port()), "-b", str(free_port())]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "where,key,value,names",
    [
        ("file", "idle_connection_timeout", "abc", ("idle_connection_timeout",)),
        ("file", "max_upstream_channels", "many", ("max_upstream_channels",)),
        ("file", "port", "notaport", ("port",)),
        ("file", "upstream", "http://example.invalid", ("upstream",)),
        (
            "env",
            "IDLE_CONNECTION_TIMEOUT",
            "abc",
            ("IDLE_CONNECTION_TIMEOUT", "idle_connection_timeout"),
        ),
        ("env", "TERM_TIMEOUT", "soon", ("TERM_TIMEOUT", "term_timeout")),
        ("env", "LISTEN_PORT", "99999", ("LISTEN_PORT", "listen_port", "port")),
        ("env", "LOG_LEVEL", "loud", ("LOG_LEVEL", "log_level")),
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(tmp_path, where, key, value, names):
    env = {}
    args = _start_args()
    if where == "file":
        section = "listen" if key in ("port", "http_port", "address") else "main"
        lines = [f"[{section}]", f"{key} = {value}"]
        if key != "upstream":
            lines = ["[main]", f"upstream = {BROKER_URL}"] + (
                lines[1:] if section == "main" else lines
            )
        ini = _write_ini(tmp_path, "\n".join(lines) + "\n")
        args += ["-c", str(ini)]
    else:
        env[key] = value
        args.append(BROKER_URL)
    res = run_proxy_cli(args, env=env, timeout=15)
    _assert_one_line_error(res, *names)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [["-t", "abc"], ["--max-upstream-channels", "x"]])
def test_bad_command_line_value_fails_without_traceback(bad):
    res = run_proxy_cli([*_start_args(), *bad, BROKER_URL], timeout=15)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr


@pytest.mark.timeout(30)
def test_missing_config_file_fails_cleanly(tmp_path):
    res = run_proxy_cli([*_start_args(), "-c", str(tmp_path / "nope.ini"), BROKER_URL], timeout=15)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr


@pytest.mark.timeout(40)
def test_proxy_started_from_config_file_and_environment_serves_clients(tmp_path, tenant, queues):
    """The file's listen port/http port and the environment's upstream are really used."""
    q = queues.declare(tenant)
    port, http_port = free_port(), free_port()
    ini = _write_ini(
        tmp_path,
        f"""\
        [main]
        upstream = amqp://127.0.0.1:1
        idle_connection_timeout = 60
        [listen]
        address = 127.0.0.1
        port = {port}
        http_port = {http_port}
        """,
    )
    p = Proxy(
        ["-c", str(ini)],
        None,
        tmp_path / "proxy.log",
        env={"AMQP_URL": BROKER_URL},
        listen_args=False,
    )
    p.port, p.http_port = port, http_port
    try:
        p.start()
        c = p.connect(tenant)
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, b"configured")
        c.close()
    finally:
        p.stop()
    assert [b for b, _, _ in drain(tenant, q)] == [b"configured"]
    # the startup line names the upstream and the frame scanner (the install builds the C one)
    assert (
        f"listening on 127.0.0.1:{port}, upstream amqp://127.0.0.1:5672, "
        "frame scanner: compiled" in p.log()
    )


@pytest.mark.timeout(40)
def test_credentials_in_upstream_url_are_ignored_with_a_warning(proxy_factory, tenant, queues):
    q = queues.declare(tenant)
    p = proxy_factory("-t", "60", upstream="amqp://url-user:url-secret@127.0.0.1:5672/url-vhost")
    c = p.connect(tenant)
    ch = c.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"own-credentials")
    c.close()
    assert [b for b, _, _ in drain(tenant, q)] == [b"own-credentials"]
    # the upstream connection is authenticated as the client, in the client's vhost
    rows = [
        r
        for r in list_connections("user", "vhost", "client_properties")
        if "itest-direct" not in r.get("client_properties", "")
    ]
    assert any(r["user"] == tenant.user and r["vhost"] == tenant.vhost for r in rows)
    assert not any(r["user"] == "url-user" for r in rows)
    own_lines = [ln for ln in p.log().splitlines() if not ln.startswith("$ ")]  # not our argv
    assert not any("url-secret" in ln for ln in own_lines), "the URL's password was logged"
    warnings = [ln for ln in own_lines if "warn" in ln.lower()]
    assert any(
        any(w in ln.lower() for w in ("credential", "ignor", "user", "vhost")) for ln in warnings
    ), f"no warning about the URL's credentials in the log:\n{p.log()}"
