"""amqproxy.tls: the contexts the settings make, and a bad file named with its setting and path
(the CLI turns that ConfigError into exit 2 and one line: tests/integration/test_tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from amqproxy import tls
from amqproxy.config import ConfigError, Settings, load


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    other = trustme.CA().issue_cert("elsewhere")
    paths = {name: str(d / name) for name in
             ("ca", "cert", "key", "other_key", "garbage", "encrypted")}  # fmt: skip
    ca.cert_pem.write_to_path(paths["ca"])
    leaf.cert_chain_pems[0].write_to_path(paths["cert"])
    leaf.private_key_pem.write_to_path(paths["key"])
    other.private_key_pem.write_to_path(paths["other_key"])
    Path(paths["garbage"]).write_text("not PEM at all\n")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    Path(paths["encrypted"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return paths


def settings(
    upstream: str = "amqp://h", env: dict[str, str] | None = None, **flags: str
) -> Settings:
    return load(None, env or {}, {"upstream": upstream, **flags})


def error(s: Settings) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        tls.load(s)
    return err.value


def test_no_tls_settings_no_listener_context() -> None:
    assert tls.load(settings()) == tls.Contexts(None, None)


def test_listener_context(files: dict[str, str]) -> None:
    plain = tls.client_context(settings(tls_cert=files["cert"], tls_key=files["key"]))
    assert plain is not None and plain.verify_mode == ssl.CERT_NONE
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    mutual = tls.client_context(
        settings(tls_cert=files["cert"], tls_key=files["key"], tls_client_ca=files["ca"])
    )
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED
    # only the given CA verifies clients, not the system's
    assert [c["subject"] for c in mutual.get_ca_certs()] == [
        c["subject"] for c in ssl.create_default_context(cafile=files["ca"]).get_ca_certs()
    ]


def test_upstream_context_verifies_the_host_name(files: dict[str, str]) -> None:
    assert tls.upstream_context(settings()) is None
    context = tls.upstream_context(
        settings("amqps://broker", upstream_ca=files["ca"], upstream_cert=files["cert"],
                 upstream_key=files["key"])
    )  # fmt: skip
    assert context is not None
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # --upstream-ca alone, not the system's CAs


@pytest.mark.parametrize(
    ("flags", "where", "words"),
    [
        ({"tls_cert": "{cert}"}, "--tls-key", "required with --tls-cert"),
        ({"tls_key": "{key}"}, "--tls-cert", "required with --tls-key"),
        ({"tls_client_ca": "{ca}"}, "--tls-client-ca", "needs --tls-cert"),
        ({"tls_cert": "{cert}", "tls_key": "{key}", "tls_port": "5673"}, "--tls-port",
         "also the plain AMQP port"),
        ({"tls_cert": "{missing}", "tls_key": "{key}"}, "--tls-cert",
         "cannot read {missing}: No such file or directory"),
        ({"tls_cert": "{garbage}", "tls_key": "{key}"}, "--tls-cert",
         "{garbage} holds no PEM certificate"),
        ({"tls_cert": "{cert}", "tls_key": "{garbage}"}, "--tls-key",
         "{garbage} holds no PEM private key"),
        ({"tls_cert": "{cert}", "tls_key": "{other_key}"}, "--tls-key",
         "{other_key} is not the key of the certificate in {cert}"),
        ({"tls_cert": "{cert}", "tls_key": "{encrypted}"}, "--tls-key",
         "{encrypted} is encrypted"),
        ({"tls_cert": "{cert}", "tls_key": "{key}", "tls_client_ca": "{garbage}"},
         "--tls-client-ca", "{garbage} holds no PEM certificate"),
        ({"upstream": "amqps://h", "upstream_ca": "{missing}"}, "--upstream-ca",
         "cannot read {missing}"),
        ({"upstream": "amqps://h", "upstream_cert": "{cert}"}, "--upstream-key",
         "required with --upstream-cert"),
        ({"upstream": "amqps://h", "upstream_cert": "{cert}", "upstream_key": "{other_key}"},
         "--upstream-key", "is not the key of the certificate"),
        ({"upstream": "amqps://h", "upstream_cert": "{key}", "upstream_key": "{key}"},
         "--upstream-cert", "holds no PEM certificate"),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_setting_and_the_path(
    files: dict[str, str], tmp_path: Path, flags: dict[str, str], where: str, words: str
) -> None:
    names = {**files, "missing": str(tmp_path / "missing.pem")}
    given = {k: v.format(**names) for k, v in flags.items()}
    err = error(settings(**given))
    assert err.key == where
    assert words.format(**names) in str(err)


def test_the_error_names_the_setting_as_it_was_given(files: dict[str, str], tmp_path: Path) -> None:
    env = {"AMQPROXY_TLS_CERT": files["cert"], "AMQPROXY_TLS_KEY": str(tmp_path / "nope")}
    assert error(settings(env=env)).key == "AMQPROXY_TLS_KEY"
    ini = tmp_path / "amqproxy.ini"
    ini.write_text(f"[main]\nupstream = amqp://h\n[listen]\ntls_cert = {files['garbage']}\n"
                   f"tls_key = {files['key']}\n")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        tls.load(load(str(ini), {}, {}))
    assert err.value.key == "[listen] tls_cert"


def test_subject_and_describe() -> None:
    cert = {"subject": ((("organizationName", "Example"),), (("commonName", "app1"),))}
    assert tls.subject(cert) == "O=Example,CN=app1"
    assert tls.subject(None) == tls.subject({}) == ""
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert (_ssl.c:2580)")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert tls.describe(alert) == "tlsv13 alert certificate required"
    assert tls.describe(ConnectionResetError()) == "ConnectionResetError"
