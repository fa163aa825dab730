"""`dbert mlflow-ui`, `dbert mlflow-server` and `dbert publish`: looking at the tracking store,
serving it to other machines, and publishing an export to the Hugging Face Hub."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

from stages.console import user_errors
from stages.invoke import resolve
from stages.options import ParamsOption, RootOption, SetOption


def mlflow_ui_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind (keep 127.0.0.1 unless you mean to share it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Start the MLflow UI on the project's tracking store (mlflow.db and mlartifacts/ at the project root)."""
    from pipeline.project import project_root
    from pipeline.tracking.store import ui_command

    with user_errors():
        _, r = resolve(params, set_, root)
        command = ui_command(host=host, port=port, root=project_root(r))
    if dry_run:
        typer.echo(" ".join(command))
        return
    typer.echo(f"MLflow UI on http://{host}:{port} (Ctrl-C to stop)", err=True)
    try:
        code = subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


def mlflow_server_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    host: Annotated[
        str,
        typer.Option(help="Interface to bind; 0.0.0.0 opens the server (no authentication) to other machines."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 2,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(help="Host names clients may use besides localhost and private IPs (mlflow's --allowed-hosts)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Start an MLflow tracking server on the project's store (mlflow.db) that serves artifacts
    (stored under <root>/mlartifacts): runs on other machines log to it through HTTP with
    MLFLOW_TRACKING_URI=http://HOST:PORT, which it prints once it answers."""
    from pipeline.project import project_root
    from pipeline.tracking import server

    def ready(plan: server.ServerPlan) -> None:
        typer.echo(
            f"MLflow server on {plan.local_url} (runs: {plan.backend_store_uri}, artifacts: "
            f"{plan.artifacts_destination}); Ctrl-C stops it. Point the pipeline at it with:",
            err=True,
        )
        for line in server.export_lines(plan):
            typer.echo(line)

    with user_errors():
        _, r = resolve(params, set_, root)
        plan = server.plan_server(project_root(r), host=host, port=port, workers=workers, allowed_hosts=allowed_hosts)
        if not dry_run:
            server.ensure_port_free(plan.host, plan.port)  # a taken port or a foreign address: one line
        for line in server.warnings(plan):
            typer.echo(line, err=True)
        if dry_run:
            typer.echo(plan.shell_command())
            typer.echo("# then point the pipeline at it with: " + "; ".join(server.export_lines(plan)), err=True)
            return
        code = server.serve(plan, on_ready=ready)
    raise typer.Exit(code)


def publish_command(
    repo_id: Annotated[str, typer.Option("--repo-id", help="USER/NAME on the Hugging Face Hub.")],
    model: Annotated[Path, typer.Option("--model", help="Export directory.")] = Path("models/final"),
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics", help="Evaluate metrics for the card (default: outputs/evaluate/metrics.json if any)."
        ),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files instead of uploading them.")] = False,
) -> None:
    """Upload an export folder with its model card (README.md, refreshed with the evaluate metrics) to the
    Hugging Face Hub in one commit; needs network access and a token (`hf auth login` or HF_TOKEN)."""
    from pipeline.model.publish import plan_publish, publish

    with user_errors():
        default = Path("outputs/evaluate/metrics.json")
        plan = plan_publish(
            model, repo_id, metrics if metrics is not None else (default if default.is_file() else None)
        )
        quoted = f", card metrics from {plan.metrics}" if plan.metrics else ", card without evaluate metrics"
        if dry_run:
            typer.echo(
                f"would upload {len(plan.files)} files ({plan.size() / 1e6:.1f} MB) to {repo_id}{quoted}:", err=True
            )
            for name in plan.files:
                typer.echo(name)
            return
        typer.echo(publish(plan, private=private))
