"""The `walt` command line.

Commands are thin: each parses its arguments and makes one library call. Heavy imports (torch,
lightning, decord) happen inside the commands, so `walt --help` stays instant.

Every command module under `walt_cli/commands/` exposes either a Typer sub-app (`app`) or plain
command functions; they are registered here and nowhere else.
"""

from __future__ import annotations

import inspect
import sys

import typer
from typer.core import TyperGroup

from walt_cli import __version__
from walt_cli.commands import data as data_cmds
from walt_cli.commands import eval as eval_cmds
from walt_cli.commands import generate as generate_cmds
from walt_cli.commands import plan as plan_cmds
from walt_cli.commands import tokenize as tokenize_cmds
from walt_cli.commands import train as train_cmds
from walt_cli.errors import WaltError

_HELP_ASKED = "walt.help_asked"  # ctx.meta key: a help option is among the command line's args


class _WaltGroup(TyperGroup):
    """Root group: turns a :class:`WaltError` raised anywhere below into one line and exit 2."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        # Noted before the subcommand parses its own: the root callback runs first, and a help
        # request should not fail on a setting only a run uses (WALT_CPU_ALLOCATOR).
        head = args[: args.index("--")] if "--" in args else args
        ctx.meta[_HELP_ASKED] = any(a in ctx.help_option_names for a in head)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except WaltError as err:
            from walt_cli.console import print_error

            print_error(str(err))
            ctx.exit(2)


app = typer.Typer(
    name="walt",
    cls=_WaltGroup,
    help="W.A.L.T video generation: tokenizer, latent transformer, cascade, FVD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"walt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """W.A.L.T video generation: tokenizer, latent transformer, cascade, FVD.

    Example: walt data preview recipes/shapes.yaml --out preview.gif
    """
    from walt_cli.runtime import keep_freed_cpu_memory

    if not ctx.meta.get(_HELP_ASKED):
        keep_freed_cpu_memory()


app.add_typer(data_cmds.app, name="data")
app.add_typer(tokenize_cmds.app, name="tokenize")
app.command("train-base")(train_cmds.train_base)
app.command("train-sr")(train_cmds.train_sr)
app.command("sample", epilog=generate_cmds.DEFAULT_MODEL_EPILOG)(generate_cmds.sample)
app.command("animate", epilog=generate_cmds.DEFAULT_MODEL_EPILOG)(generate_cmds.animate)
app.command("export")(generate_cmds.export)
app.command("eval-fvd")(eval_cmds.eval_fvd)
app.command("plan")(plan_cmds.plan)


def _reflow(text: str | None) -> str | None:
    """Each paragraph of a help text on one line."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _reflow_help(group: typer.Typer) -> None:
    """Typer's Rich help (rich_markup_mode "rich") keeps a docstring's single line breaks, so a
    paragraph wrapped at 100 columns in the source came out as 80-column lines broken
    mid-sentence; with each paragraph on one line Rich wraps it to the terminal.
    rich_markup_mode="markdown" would reflow too, but reads the `<name>` of the paths in our
    help texts as HTML tags and their `*` and `_` as emphasis."""
    for command in group.registered_commands:
        command.help = _reflow(command.help or command.callback.__doc__)
    for sub in group.registered_groups:
        sub.typer_instance.info.help = _reflow(sub.typer_instance.info.help)
        _reflow_help(sub.typer_instance)


_reflow_help(app)


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
