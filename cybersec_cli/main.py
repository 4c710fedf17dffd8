"""``cybersec``: the command-line entry point."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cybersec_cli import client
from cybersec_cli.schedules import schedule_app, webhook_app
from shared.keys import KeyStore
from shared.migrate import migrate as apply_migrations
from shared.settings import load_settings, redact_url
from shared.store import create_pool

T = TypeVar("T")

app = typer.Typer(help="cybersec-scan: administration and client commands.", no_args_is_help=True)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Subcommands follow."""


@app.command()
def migrate() -> None:
    """Create the database if needed and apply pending migrations."""
    settings = load_settings()
    try:
        applied = asyncio.run(apply_migrations(settings.database_url))
    except OSError as exc:
        console.print(
            f"[red]PostgreSQL unreachable at {redact_url(settings.database_url)}: {exc}[/red]"
        )
        raise typer.Exit(2) from None
    if applied:
        console.print(f"applied: {', '.join(applied)}")
    else:
        console.print("database schema is up to date")


app.add_typer(client.app)  # scan, status, list, cancel, result, diff
app.add_typer(schedule_app, name="schedule")
app.add_typer(webhook_app, name="webhook")

keys_app = typer.Typer(help="API keys: shown once at creation, stored only as hashes.")
app.add_typer(keys_app, name="keys")


def with_keys(action: Callable[[KeyStore], Awaitable[T]]) -> T:
    settings = load_settings()

    async def run() -> T:
        pool = await create_pool(settings.database_url, max_size=1)
        try:
            return await action(KeyStore(pool))
        finally:
            await pool.close()

    try:
        return asyncio.run(run())
    except OSError as exc:
        console.print(
            f"[red]PostgreSQL unreachable at {redact_url(settings.database_url)}: {exc}[/red]"
        )
        raise typer.Exit(2) from None


@keys_app.command("create")
def keys_create(name: str = typer.Option(..., "--name", help="Who or what uses the key")) -> None:
    """Create a key and print it once; only its hash is kept."""
    key = with_keys(lambda keys: keys.create(name))
    console.print(f"created key [bold]{name}[/bold]; store it now, it is not shown again:")
    print(key)


@keys_app.command("list")
def keys_list() -> None:
    """Every key with its prefix, source and state (never the key itself)."""
    rows: list[Any] = with_keys(lambda keys: keys.list())
    table = Table("id", "name", "prefix", "source", "created", "state")
    for key in rows:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        table.add_row(
            str(key.id),
            key.name,
            key.key_prefix,
            key.source,
            f"{key.created_at:%Y-%m-%d %H:%M}",
            state,
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(ident: str = typer.Argument(..., help="Key id, name or prefix")) -> None:
    """Revoke keys by id, name or prefix; the API refuses them within seconds."""
    count = with_keys(lambda keys: keys.revoke(ident))
    if count == 0:
        console.print(f"[red]no active key matches {ident!r}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {count} key(s)")


@app.command()
def dev() -> None:
    """Check the services, migrate, then run the API and one worker until Ctrl-C."""
    from cybersec_cli.dev import dev_environment, run_dev

    api_key = dev_environment()
    raise typer.Exit(run_dev(load_settings(), console, api_key))


if __name__ == "__main__":
    app()
