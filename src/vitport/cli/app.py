"""The typer app every command registers on, its shared options, output and error handling."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

from vitport.cli.flags import cli_message
from vitport.errors import VitportError

try:  # typer 0.2x and later run on their own copy of click
    from typer import _click as click
    from typer._click.exceptions import ClickException
except ImportError:  # earlier typer runs on click itself
    import click
    from click import ClickException


if hasattr(TyperOption, "display_type_rich"):  # typer 0.2x prints '<bool>' beside every flag
    _value_type = TyperOption.display_type_rich

    def _no_type_for_flags(self: TyperOption, ctx: object) -> str | None:
        """Help shows a value type only for options that take a value: flags take none."""
        return None if self.is_flag else _value_type(self, ctx)

    TyperOption.display_type_rich = _no_type_for_flags

try:  # typer's help tables: only the last column (the help text) wraps
    from rich.table import Table as _RichTable
    from typer import rich_utils as _rich_utils

    class _HelpTable(_RichTable):
        """An options or commands table whose names and types are never wrapped or cut to
        `--max-images-per-re…` on a narrow terminal: the help text beside them wraps instead."""

        def add_row(self, *renderables: object, **kwargs: object) -> None:
            super().add_row(*renderables, **kwargs)
            for column in self.columns[:-1]:
                column.no_wrap = True

    _rich_utils.Table = _HelpTable
except ImportError:  # typer without rich prints click's plain help, which never cuts a name
    pass

FLAG_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def refuse_flag_values(params: list, args: list[str], upto_command: bool = False) -> None:
    """`--strict true a.jpg` is refused in one line, not read as an image called 'true': flags
    take no value. upto_command: look only before the command (the app's own options)."""
    flags = {
        name
        for param in params
        if isinstance(param, TyperOption) and param.is_flag
        for name in (*param.opts, *param.secondary_opts)
    }
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--" or (upto_command and not flag.startswith("-")):
            break
        if flag in flags and value.lower() in FLAG_WORDS and not Path(value).exists():
            raise VitportError(f"{flag} is a flag and takes no value: drop '{value}'")


def escape_help(command: click.Command) -> None:
    """Help text reads as written: 'vitport[ray]' is never taken for markup. Only the epilog
    styles on purpose."""
    from rich.markup import escape

    command.help = command.help and escape(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)


class Command(TyperCommand):
    """A command whose help is never markup and whose flags refuse a value."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        escape_help(self)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_flag_values(self.params, args)
        return super().parse_args(ctx, args)


class Group(TyperGroup):
    """The app, whose help is never markup and whose own flags (--quiet, --wide, ...) refuse a
    value."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        escape_help(self)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_flag_values(self.params, args, upto_command=True)
        return super().parse_args(ctx, args)


def esc(text: object) -> str:
    """User text (paths, specs, image names, messages) printed as written, never as markup."""
    from rich.markup import escape

    return escape(str(text))


app = typer.Typer(
    name="vitport",
    cls=Group,
    help=(
        "Bring vision-transformer encoders (DINOv2, DINOv3, ViT, AIMv2, timm ViTs) to new "
        "hardware (Ascend NPU, CUDA, CPU, ...): load, run, and prove the port faithful and fast.\n\n"
        "Model specs: demo:dinov2-small (a real trained model, no model hub needed), hf:ORG/NAME or ORG/NAME "
        "(Hugging Face), ms:ORG/NAME (ModelScope), atomgit:ORG/NAME (AtomGit), timm:NAME "
        "[--weights FILE], or a local directory."
    ),
    epilog=(
        "A port, step by step: [bold]vitport infer[/bold] (does it run?), [bold]vitport compare "
        "--localize --try-fixes[/bold] (is it faithful, and if not, where and what cures it?), "
        "[bold]vitport bench --optimize[/bold] (how fast, and the fastest faithful setting), "
        "[bold]vitport report[/bold] (all of it, written up). [bold]vitport convert[/bold] moves "
        "checkpoints between layouts and to ONNX, proven unchanged; [bold]vitport embed[/bold] "
        "turns image collections into features. Errors are one line and exit 2; "
        "add --debug, before or after the command, for a traceback."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)
STATE = {"debug": False, "quiet": False, "wide": False}

MODEL_SPECS = (
    "demo:NAME, hf:ORG/NAME, ms:ORG/NAME, atomgit:ORG/NAME, timm:NAME, or a local directory"
)
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"Model spec: {MODEL_SPECS}.",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", "-d", help="auto, cpu, cuda[:N], npu[:N], xpu or mps.")
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="fp32, fp16, bf16, or fp64 (slow; for exact references); default: a port's own "
        "(its vitport.json), else fp32.",
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Input side in pixels (a multiple of the patch size); default: the model's."
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(help="Local weights (.safetensors, or weights-only .pth) for timm:NAME."),
]
RemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a checkpoint's own Python code to run.")
]
CudaShimOpt = Annotated[
    bool,
    typer.Option(
        "--cuda-shim", help="Forward torch.cuda calls to the NPU, for code written for CUDA."
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        help="--optimize: stop after about this many seconds (default 600), or 'none' to try "
        "every configuration; the likeliest winners run first and what was skipped is listed.",
    ),
]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="What runs the model: torch, compile (torch.compile), onnxruntime, openvino (CPU), "
        "tensorrt (CUDA) or torchair (NPU); the others are built from the fp32 model.",
    ),
]
RuntimesOpt = Annotated[
    str | None,
    typer.Option(
        help="--optimize: the runtimes to search, comma-separated (default: every one installed "
        "that applies to the device; the others are listed as skipped)."
    ),
]
MinSecondsOpt = Annotated[float, typer.Option(min=0.0, help="Measured window per batch size.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace an existing output, whoever wrote it."),
]
FixOpt = Annotated[
    str | None,
    typer.Option(
        "--fix",
        help="Precision fixes to apply, comma-separated (see vitport fixes), or none; default: a "
        "port's own (its vitport.json), else none.",
    ),
]
ImagesArg = Annotated[
    list[Path] | None, typer.Argument(help="Image files or directories (searched recursively).")
]


def show_version(value: bool) -> None:
    if value:
        from vitport import __version__

        console.print(f"vitport {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show full tracebacks on errors (also after the command)."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or spinners; results only.")
    ] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every table column, whatever the terminal's width.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    STATE["debug"] = debug or STATE["debug"]
    STATE["quiet"] = quiet
    STATE["wide"] = wide


def main() -> None:
    """Entry point: run the app, turning known errors into one line and an exit code."""
    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:  # accepted before or after the command
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except VitportError as exc:
        if debug:
            traceback.print_exc()
        message = cli_message(exc)
        errors.print(f"[red]error:[/red] {esc(message)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/red]")
        sys.exit(130)
    except ClickException as exc:  # usage errors: click's own message and exit code
        exc.show()
        sys.exit(exc.exit_code or 2)
    except typer.Abort:  # click.exceptions.Abort where typer runs on click
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - anything else: one line, with the way to see more
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        errors.print(
            f"[red]error:[/red] {type(exc).__name__}: {esc(exc)}{hint}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


def reflow_help() -> None:
    """Command help reflows to the terminal: a docstring's hard line breaks join within each
    paragraph (paragraphs stay apart). Run once every command is registered."""
    import inspect

    for info in app.registered_commands:
        doc = inspect.getdoc(info.callback) or ""
        info.help = "\n\n".join(" ".join(part.split()) for part in doc.split("\n\n")) or None
