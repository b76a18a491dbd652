"""The ``tierstore`` command line.

Exit codes: 0 success, 1 a check failed (e.g. ``verify`` found a mismatch),
2 misuse (bad flags, bad URL), 3 a store refused or could not be reached.
Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

from tierstore.errors import StorageError, TierstoreError

try:
    import typer
except ModuleNotFoundError:  # pragma: no cover - exercised when the cli extra is absent
    typer = None  # type: ignore[assignment]

__all__ = ["main"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3


def _fail(exc: TierstoreError) -> int:
    kind = "error" if isinstance(exc, StorageError) else "usage error"
    print(f"tierstore: {kind}: {exc}", file=sys.stderr)
    return EXIT_STORAGE if isinstance(exc, StorageError) else EXIT_USAGE


def _demo(directory: Path | None) -> int:
    from tierstore.demo import run_demo

    run_demo(directory)
    return EXIT_OK


def _migrate(hot: str | None, warm: str | None, cold: str | None) -> int:
    from tierstore.saver import TieredSaver
    from tierstore.settings import urls_from_env

    env = urls_from_env()
    saver = TieredSaver.from_urls(
        hot=hot if hot is not None else env["hot"],
        warm=warm or env["warm"] or "",
        cold=cold if cold is not None else env["cold"],
    )

    async def run() -> None:
        async with saver:
            pass

    asyncio.run(run())
    print("schema and stores are up to date")
    return EXIT_OK


def _build_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Tiered checkpoint storage for LangGraph.")

    @app.command()
    def demo(
        directory: Annotated[Path | None, typer.Option(
            "--dir", help="keep the demo's stores in this directory")] = None,
    ) -> None:
        """Run a deterministic agent on the embedded stack and show the tiers at work."""
        raise typer.Exit(_demo(directory))

    @app.command()
    def migrate(
        hot: Annotated[str | None, typer.Option(help="hot tier URL")] = None,
        warm: Annotated[str | None, typer.Option(help="warm tier URL")] = None,
        cold: Annotated[str | None, typer.Option(help="cold tier URL")] = None,
    ) -> None:
        """Create or upgrade the schema, indexes, directories and buckets (idempotent)."""
        raise typer.Exit(_migrate(hot, warm, cold))

    return app


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if typer is None:
        if args[:1] == ["demo"]:
            return _demo(None)
        print("tierstore: the command line needs: pip install 'tierstore[cli]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        _build_app()(args, standalone_mode=False)
    except TierstoreError as exc:
        return _fail(exc)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return EXIT_USAGE
        if isinstance(exc, click.exceptions.Abort):
            return EXIT_USAGE
        raise
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
