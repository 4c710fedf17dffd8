"""`cybersec migrate` and `cybersec keys` never print a database password."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bench._stack import free_port
from cybersec_cli.main import app
from shared.settings import redact_url

SECRET = "s3cret-Pw-9f2"  # noqa: S105 - the password the test looks for in the output


@pytest.mark.parametrize("args", [["migrate"], ["keys", "list"], ["keys", "revoke", "x"]])
def test_an_unreachable_database_is_named_without_its_password(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://scanner:{SECRET}@127.0.0.1:{free_port()}/cybersec"
    monkeypatch.setenv("CYBERSEC_DATABASE_URL", url)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "PostgreSQL unreachable at postgresql://scanner:***@127.0.0.1:" in result.output
    assert SECRET not in result.output


def test_redact_url_keeps_everything_but_the_password() -> None:
    assert redact_url("amqp://u:p@h:5672//") == "amqp://u:***@h:5672//"
    assert redact_url("redis://:p@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
