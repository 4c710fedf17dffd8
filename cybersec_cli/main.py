"""``cybersec``: the command-line entry point."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from shared.migrate import migrate as apply_migrations
from shared.settings import load_settings

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
        console.print(f"[red]PostgreSQL unreachable at {settings.database_url}: {exc}[/red]")
        raise typer.Exit(2) from None
    if applied:
        console.print(f"applied: {', '.join(applied)}")
    else:
        console.print("database schema is up to date")


@app.command()
def dev() -> None:
    """Check the services, migrate, then run the API and one worker until Ctrl-C."""
    from cybersec_cli.dev import dev_environment, run_dev

    dev_environment()
    raise typer.Exit(run_dev(load_settings(), console))


if __name__ == "__main__":
    app()
