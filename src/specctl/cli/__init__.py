"""The `specctl` command: a table from command names to thin command modules.

Command modules import nothing heavy at load time (torch, transformers, mooncake are
imported inside command bodies) so `specctl --help` stays instant; a test enforces it.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import typer

from specctl.console import debug_enabled, err
from specctl.errors import SpecctlError

# name -> (module under specctl.cli, one-line help). Order is the order in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "store": ("store", "Run the store: Mooncake data plane + control plane (up/status/down)."),
    "serve-target": (
        "serve_target",
        "Run a target model and stream its hidden states into the store.",
    ),
    "train-draft": ("train_draft", "Train an EAGLE-3 draft from the store under torchrun (FSDP2)."),
    "eval-accept": (
        "eval_accept",
        "Speculative decoding with target + draft: acceptance and speed-up.",
    ),
    "export": ("export", "Write a draft checkpoint as an SGLang / vLLM serving directory."),
}

app = typer.Typer(
    name="specctl",
    help="Train speculative-decoding draft models from streamed target hidden states.\n\n"
    "Every command prints progress on stderr and one JSON summary line on stdout.\n"
    "The store address comes from --store HOST:PORT or SPECCTL_STORE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"specctl.cli.{module}")
        target: Any = mod.command
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name, help=help_text)
        else:
            app.command(name=name, short_help=help_text)(target)


_register()


def _on_signal(signum: int, _frame: Any) -> None:
    # Raise into the command so `finally` blocks stop child processes; exit 128+signum.
    raise SystemExit(128 + signum)


def main() -> None:
    from rich.markup import escape  # messages may hold brackets (paths, gloo's "[file:line]")
    from typer._click import exceptions as click_exc  # typer vendors click

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        # Not standalone: click's usage errors come back to us, so they print as one
        # `Error:` line like every other failure instead of a boxed panel.
        rv = app(standalone_mode=False, prog_name="specctl")
        sys.exit(rv if isinstance(rv, int) else 0)
    except click_exc.NoArgsIsHelpError as e:  # `specctl` / `specctl store` alone: the help
        err.print(e.format_message(), markup=False, highlight=False)
        sys.exit(2)
    except click_exc.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        err.print(f"[bold red]Error:[/] {escape(e.format_message())}{where}", highlight=False)
        sys.exit(e.exit_code)
    except click_exc.ClickException as e:
        err.print(f"[bold red]Error:[/] {escape(e.format_message())}", highlight=False)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except SpecctlError as e:
        if debug_enabled():
            raise
        err.print(f"[bold red]Error:[/] {escape(str(e))}", markup=True, highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        if debug_enabled():
            raise
        err.print(
            f"[bold red]Error:[/] internal error: {type(e).__name__}: {escape(str(e))} "
            "(rerun with SPECCTL_DEBUG=1 for the traceback)",
            highlight=False,
        )
        sys.exit(1)
