"""`vitport publish`: wiring of vitport.port.publish to the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitport.cli.app import STATE, console, esc
from vitport.format import count


def publish(
    directory: Annotated[
        Path,
        typer.Argument(help="A port written by vitport report --package (holds vitport.json)."),
    ],
    target: Annotated[
        str,
        typer.Argument(
            help="Where to: atomgit:ORG/NAME (or GROUP/ORG/NAME, as AtomGit's client writes "
            "it), hf:ORG/NAME or ms:ORG/NAME."
        ),
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private, if it is missing.")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            help="Branch to commit to (created if missing); default: the repository's own."
        ),
    ] = None,
    message: Annotated[
        str | None, typer.Option(help="Commit message; default: the port, its device and verdict.")
    ] = None,
    allow_fail: Annotated[
        bool,
        typer.Option(
            "--allow-fail",
            help="Publish a port whose verdict is FAIL; its card and vitport.json are made to "
            "say so first, where the packaging did not.",
        ),
    ] = False,
) -> None:
    """Publish a packaged port to AtomGit, the Hugging Face hub or ModelScope.

    Creates the repository if it is missing and uploads the port's files; a file the hub already holds as it is goes up again never, so publishing an unchanged port uploads nothing new. Tokens come from each hub's own variable: VITPORT_ATOMGIT_TOKEN for AtomGit (never the Hugging Face token), HF_TOKEN or `hf auth login` for the Hugging Face hub, MODELSCOPE_API_TOKEN for ModelScope; VITPORT_ATOMGIT_ENDPOINT, HF_ENDPOINT and MODELSCOPE_ENDPOINT move them.

    Refused before anything is sent (exit 2): a directory that is not a port, a port whose verdict is FAIL (unless --allow-fail, which first makes the port's card state the FAIL verdict where it does not), a missing token, weights that differ from the sha256 in vitport.json. An unreachable hub or a refused upload exits 1.
    """
    from vitport.port.publish import publish as run_publish

    if STATE["quiet"]:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    result = run_publish(
        directory,
        target,
        private=private,
        revision=revision,
        message=message,
        allow_fail=allow_fail,
    )
    console.print(
        f"published {esc(directory)} to {esc(result.hub)}: {esc(result.url)}", soft_wrap=True
    )
    commit = f", commit {result.commit[:12]}" if result.commit else ""
    where = f"[dim](revision {esc(result.revision)}{commit})[/dim]"
    if result.nothing_new:
        console.print(
            f"nothing new: {esc(result.hub)} already holds all "
            f"{count(len(result.unchanged), 'file')} {where}",
            soft_wrap=True,
        )
    else:
        console.print(f"uploaded {count(len(result.uploaded), 'file')} {where}:")
        for name in result.uploaded:
            console.print(f"  {esc(name)}", soft_wrap=True)
        if result.unchanged:
            console.print(f"[dim]{count(len(result.unchanged), 'file')} unchanged[/dim]")
    if result.amended:
        console.print(
            f"[yellow]note:[/yellow] {esc(directory)}'s README.md and vitport.json now state its "
            "FAIL verdict, as published (--allow-fail)",
            soft_wrap=True,
        )
    elif result.allow_fail:
        console.print(
            "[yellow]note:[/yellow] published with its verdict FAIL (--allow-fail); its card "
            "says so"
        )
