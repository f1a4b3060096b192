from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import ConfigError, Settings, normalize_database_url


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.port == 8000
    assert settings.database_url == "sqlite+aiosqlite:///data/gateway.db"
    assert settings.redis_url is None
    assert settings.gateway_url == "http://127.0.0.1:8000"
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.data_dir == Path("data")


def test_data_dir_and_port_shape_the_other_defaults() -> None:
    settings = Settings.from_env({"DATA_DIR": "/srv/gw", "PORT": "9000"})
    assert settings.database_url == "sqlite+aiosqlite:////srv/gw/gateway.db"
    assert settings.gateway_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_database_urls_map_onto_async_drivers(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PORT": "x"}, "PORT"),
        ({"MAX_BODY_BYTES": "10"}, "MAX_BODY_BYTES"),
        ({"WORKER_POLL_DELAY": "soon"}, "WORKER_POLL_DELAY"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        (
            {"GATEWAY_PREVIOUS_SECRET_KEYS": "a-whole-old-key-1234, short"},
            "GATEWAY_PREVIOUS_SECRET_KEYS",
        ),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.name == name


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_SECRET_KEY"):
        Settings.from_env({"GATEWAY_SECRET_KEY": "short"}).require_secret()


def test_previous_keys_are_accepted_and_the_current_one_signs() -> None:
    from itsdangerous import BadSignature, URLSafeTimedSerializer

    old, new = "the-old-key-0123456789", "the-new-key-0123456789"
    settings = Settings.from_env(
        {"GATEWAY_SECRET_KEY": new, "GATEWAY_PREVIOUS_SECRET_KEYS": f" {old}, {new} ,"}
    )
    assert settings.secret_keys() == [old, new]
    made_before = URLSafeTimedSerializer(old, salt="s").dumps("x")
    both = URLSafeTimedSerializer(settings.secret_keys(), salt="s")
    assert both.loads(made_before) == "x"
    assert URLSafeTimedSerializer(new, salt="s").loads(both.dumps("y")) == "y"
    with pytest.raises(BadSignature):
        URLSafeTimedSerializer(new, salt="s").loads(made_before)


def test_database_urls_take_libpq_tls_and_pgbouncer_parameters(tmp_path: Path) -> None:
    import ssl

    from db.engine import postgres_connection

    url, args = postgres_connection("postgresql+asyncpg://u@h/db?sslmode=require&pgbouncer=true")
    assert dict(url.query) == {"prepared_statement_cache_size": "0"}
    assert args["ssl"] == "require" and args["statement_cache_size"] == 0
    assert args["prepared_statement_name_func"]() != args["prepared_statement_name_func"]()
    plain, none = postgres_connection("postgresql+asyncpg://u@h/db")
    assert not plain.query and none == {}
    from tests.certs import Certs

    certs = Certs(tmp_path)
    _, verify = postgres_connection(
        f"postgresql+asyncpg://u@h/db?sslmode=verify-ca&sslrootcert={certs.ca}"
    )
    assert isinstance(verify["ssl"], ssl.SSLContext) and not verify["ssl"].check_hostname
    assert verify["ssl"].verify_mode == ssl.CERT_REQUIRED


def test_rediss_urls_carry_their_tls_parameters() -> None:
    from jobs.protocol import redis_settings

    plain = redis_settings("redis://h:7/3")
    assert (plain.host, plain.port, plain.database, plain.ssl) == ("h", 7, 3, False)
    tls = redis_settings(
        "rediss://:pw@h:7/1?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k"
    )
    assert (tls.ssl, tls.ssl_ca_certs, tls.ssl_certfile, tls.ssl_keyfile) == (
        True,
        "/ca.pem",
        "/c.pem",
        "/k",
    )
    assert tls.ssl_check_hostname and tls.password == "pw"
    loose = redis_settings("rediss://h/0?ssl_cert_reqs=none")
    assert loose.ssl_cert_reqs == "none" and not loose.ssl_check_hostname
