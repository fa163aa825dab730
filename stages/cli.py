"""`dbert`: one command per pipeline stage (the same code `dvc repro` runs), plus generate,
tune, params, mlflow-ui and mlflow-server.

Every command takes `--params PATH` (default <root>/params.yaml), repeatable `--set key=value`
(the syntax of `dvc exp run -S`) and `--root DIR` (default: the nearest directory at or above
the current one that holds dvc.yaml or params.yaml). Bad input ends in one line `error: ...` on
stderr and exit code 1, and no stage leaves a half-written output behind. Set DBERT_DEBUG=1 to
see the traceback instead. SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop a command cleanly: its MLflow
runs end KILLED, nothing half-written stays, one line `stopped by SIGTERM` and exit code 143
(130 for SIGINT, 129 for SIGHUP). Progress bars go to stderr, so stdout stays clean for `generate`
and `params`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from stages import ablation, evaluate, generate, prepare, samplers, schedule, token_stats, train, tune
from stages.console import ENV_PROGRESS, user_errors
from stages.invoke import echo_summary, resolve, run_stage, stage_help

app = typer.Typer(
    name="dbert",
    help="DiffusionBERT pipeline: prepare -> token-stats -> schedule -> train -> evaluate -> samplers (each a DVC stage "
    "and an MLflow run), plus generate, tune, ablation, params, mlflow-ui and mlflow-server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", metavar="PATH", help="Params file (default: <root>/params.yaml).", dir_okay=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        metavar="KEY=VALUE",
        help="Override a param, e.g. train.lr=3e-4 (the syntax of `dvc exp run -S`); repeatable.",
    ),
]
ExperimentOption = Annotated[
    Path | None,
    typer.Option(
        "--experiment",
        "-e",
        metavar="FILE",
        dir_okay=False,
        help="An experiment file (experiments/*.yaml): params.yaml-shaped overrides, applied before any --set.",
    ),
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        metavar="DIR",
        file_okay=False,
        help="Project checkout to read from and write to (default: the nearest directory at or above "
        "the current one with dvc.yaml or params.yaml).",
    ),
]


@app.command(
    "prepare",
    help=stage_help(
        prepare,
        "Read the corpus and tokenize it.",
        "The corpus is data.source; the LM1B mirror data.mirror_dir is relative to the project root and "
        "$DBERT_LM1B_DIR overrides it.",
    ),
)
def prepare_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    run_stage(
        prepare,
        params,
        set_,
        root,
        echo=("output", "source", "train_sequences", "validation_sequences", "test_sequences"),
    )


@app.command(
    "token-stats",
    help=stage_help(
        token_stats, "Count tokens of the training split: information per vocabulary id and the length histogram."
    ),
)
def token_stats_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    run_stage(
        token_stats,
        params,
        set_,
        root,
        bars=False,
        echo=("output", "metrics", "sentences", "tokens", "ids_seen", "unigram_entropy_bits"),
    )


@app.command(
    "schedule",
    help=stage_help(
        schedule,
        "Build the noise schedule, check alpha_t(v) is monotone for every id at every step, and draw it.",
        "A schedule that fails the check writes nothing.",
    ),
)
def schedule_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    run_stage(
        schedule,
        params,
        set_,
        root,
        echo=("output", "schedule", "num_timesteps", "monotone", "limit", "lambda_times_max_h", "token_spread"),
    )


@app.command(
    "train",
    help=stage_help(
        train,
        "Train the denoiser with Ray Train (train.num_workers workers; 0 = in this process).",
        "Checkpoints go to checkpoints/ (not a DVC output); --resume continues from the latest.",
    ),
)
def train_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last run from its latest checkpoint.")] = False,
    experiment: ExperimentOption = None,
) -> None:
    run_stage(
        train,
        params,
        with_experiment(experiment, set_),
        root,
        quiet_transformers=True,
        resume=resume,
        echo=("model", "step", "val_bound", "val_ppl", "tokens_per_s", "precision", "mlflow_run_id"),
    )


@app.command(
    "evaluate",
    help=stage_help(
        evaluate,
        "Perplexity bound on the test split, BLEU / Self-BLEU of samples, plots.",
        "--model evaluates another export directory instead of models/final.",
    ),
)
def evaluate_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    model: Annotated[Path | None, typer.Option("--model", help="Export directory (default: models/final).")] = None,
) -> None:
    from pipeline.eval.report import summary_lines

    summary = run_stage(evaluate, params, set_, root, quiet_transformers=True, model_dir=model)
    for line in summary_lines(summary):
        typer.echo(line)
    echo_summary(summary, ("outputs",))


@app.command(
    "samplers",
    help=stage_help(
        samplers,
        "Compare the samplers on the trained model: the steps table (bound of each k-step chain, samples with k "
        "steps), BLEU vs Self-BLEU over top-k, and every sampler of evaluate.compare_samplers at every "
        "evaluate.compare_steps (quality, diversity, model calls and seconds per sample; the ancestral sampler at "
        "every evaluate.table_steps).",
        "--model compares another export directory instead of models/final. Only the ancestral sampler is the "
        "model's chain; the table marks it.",
    ),
)
def samplers_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    model: Annotated[Path | None, typer.Option("--model", help="Export directory (default: models/final).")] = None,
) -> None:
    summary = run_stage(samplers, params, set_, root, quiet_transformers=True, model_dir=model)
    echo_summary(summary, ("outputs",))


@app.command(
    "tune",
    help=stage_help(
        tune,
        "Ray Tune over tune.* (time designs, and lr / spindle lambda / power gamma when listed); opt-in, not a DVC stage.",
        "Also a parent MLflow run with one nested run per trial. Prints the proposal; never edits params.yaml "
        "(--apply runs it as a DVC experiment in a temporary copy: compare with `dvc exp show`, adopt with "
        "`dvc exp apply <name>`).",
    ),
)
def tune_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    experiment: ExperimentOption = None,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="Run the proposal as `dvc exp run --temp -S ...` (the "
            "workspace stays as it is; `dvc exp apply` adopts it).",
        ),
    ] = False,
) -> None:
    def show(summary: dict) -> None:
        typer.echo(f"# proposal ({summary['proposal_path']}):")
        typer.echo(summary["proposal_text"].rstrip("\n"))
        if not apply:
            typer.echo(
                "# apply it with: dbert tune --apply, or: dvc exp run --temp "
                + " ".join(f"-S {o}" for o in summary["overrides"])
            )

    run_stage(tune, params, with_experiment(experiment, set_), root, bars=False, apply=apply, on_proposal=show)


@app.command(
    "ablation",
    help=stage_help(
        ablation,
        "PAPER §8's rows (D3PM, DiffusionBERT linear/spindle x time designs, BERT-Mouth, the leaky "
        "spindle_paper, a packed row), one budget each (ablation.train_steps), and one report.",
        "Each row is the base params plus its overrides; run `dvc repro token_stats` first. One MLflow parent run "
        "with a child per row. Run it again to resume: finished rows are reused and an interrupted one continues "
        "from its checkpoint.",
    ),
)
def ablation_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    rows: Annotated[
        list[str] | None,
        typer.Option("--row", metavar="NAME", help="Run only this row (repeatable; default: ablation.rows)."),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete outputs/ablation first instead of resuming.")] = False,
    background: Annotated[
        bool,
        typer.Option(
            "--background",
            help="Detach: run in a new session, log to <ablation.out>/run.log (outputs/ablation/), print the pid.",
        ),
    ] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Train and evaluate nothing: write the report of the rows finished so far (here or under "
            "ablation.publish), e.g. while the rows run elsewhere or after the report code changed.",
        ),
    ] = False,
    experiment: ExperimentOption = None,
) -> None:
    import time

    if report_only and (rows or fresh or background):
        raise typer.BadParameter("--report-only reports the whole plan: drop --row, --fresh and --background")
    if background:
        ablation_in_background(params, set_, root, rows, fresh, experiment)
        return
    set_ = with_experiment(experiment, set_)
    if report_only:
        with user_errors():
            summary = ablation.report_only(*resolve(params, set_, root), command=_command_line())
        typer.echo(f"report: {summary['report']}/report.md ({summary['rows']} rows finished)")
        for number, verdict in summary["claims"].items():
            typer.echo(f"claim {number}: {verdict}")
        return

    def on_row(index: int, total: int, key: str, status: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        typer.echo(f"[{stamp}] row {index + 1}/{total} {key}: {status}", err=True)

    summary = run_stage(
        ablation,
        params,
        set_,
        root,
        quiet_transformers=True,
        only=rows,
        fresh=fresh,
        on_row=on_row,
        command=_command_line(),
    )
    typer.echo(f"report: {summary['report']}/report.md")
    typer.echo(f"mlflow_run_id: {summary['mlflow_run_id']}")
    for number, verdict in summary["claims"].items():
        typer.echo(f"claim {number}: {verdict}")


def with_experiment(experiment: Path | None, overrides: list[str] | None) -> list[str]:
    """The experiment file's overrides, then the command line's `--set`s (a bad file: one-line error)."""
    if experiment is None:
        return list(overrides or [])
    from pipeline.config import experiment_overrides

    with user_errors():
        return [*experiment_overrides(experiment), *(overrides or [])]


def _command_line() -> str:
    """`dbert <the arguments this process got>`: what a report says it was written by."""
    import shlex
    import sys

    return shlex.join(["dbert", *sys.argv[1:]])


def ablation_in_background(
    params: Path | None,
    overrides: list[str] | None,
    root: Path | None,
    rows: list[str] | None,
    fresh: bool,
    experiment: Path | None = None,
) -> None:
    """`dbert ablation` again in a new session, logging to `<ablation.out>/run.log` (two experiments
    with their own `ablation.out` run side by side); bad params or an unknown row fail here, not in
    the detached process."""
    import sys

    from pipeline.ablation.rows import plan

    with user_errors():
        p, r = resolve(params, with_experiment(experiment, overrides), root)
        plan(p, rows)
        out = r / p.ablation.out
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "stages.cli", "ablation", "--root", str(r)]
        command += [f"--params={params}"] if params else []
        command += [f"--experiment={Path(experiment).resolve()}"] if experiment else []
        command += [f"--set={item}" for item in overrides or []] + [f"--row={row}" for row in rows or []]
        command += ["--fresh"] if fresh else []
        with open(out / "run.log", "ab") as log:
            child = subprocess.Popen(
                command,
                cwd=r,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={ENV_PROGRESS: "log", **os.environ},  # the log says how far it got (unless set otherwise)
            )
        (out / "run.pid").write_text(f"{child.pid}\n", encoding="utf-8")
    typer.echo(
        f"ablation running in the background, pid {child.pid}; follow: tail -f {out / 'run.log'}; "
        f"stop: kill {child.pid} (run `dbert ablation` again to resume)"
    )


@app.command(
    "generate",
    help=stage_help(
        generate,
        "Sample sentences from an exported model and print them, one per line: unconditionally, or continuing "
        "--prompt texts, or filling the [MASK] gaps of --infill templates (the given words never change).",
        "--model reads another export directory than models/final; lengths.npy only for --length 0 without a "
        "request. Example: dbert generate --infill 'the [MASK*3] is on the table .' --num 3. The sampling "
        "options set their params for this run and are checked by the params schema like --set. --output writes "
        "the sentences to a file (atomically) instead of stdout.",
    ),
)
def generate_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    model: Annotated[Path | None, typer.Option("--model", help="Export directory (default: models/final).")] = None,
    num: Annotated[
        int | None,
        typer.Option(
            "--num", "-n", help="Sentences (unconditional; default 8), or samples per request (conditional; default 1)."
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            "-p",
            help="Continue this text (repeatable); --length WordPieces are generated after it (0 = 16).",
        ),
    ] = None,
    infill: Annotated[
        list[str] | None,
        typer.Option(
            "--infill",
            "-i",
            help="Fill the gaps of this text (repeatable): [MASK] marks one generated WordPiece, [MASK*n] n of "
            "them, e.g. 'the [MASK*3] sat on the [MASK] .'",
        ),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            help="A file of requests, one per line: a line with a [MASK] gap is an infill template, any other "
            "a prompt.",
            dir_okay=False,
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="text: one sentence per line; jsonl: one JSON object per line (request, kind, text, the "
            "generated spans).",
        ),
    ] = "text",
    length: Annotated[
        int | None,
        typer.Option(
            help="WordPieces per sentence (unconditional; 0 = draw from the training length histogram, 32 without "
            "one), or after each prompt (0 = 16). Sets evaluate.sample_length."
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Reverse steps; sets evaluate.sample_steps.")] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            help="ancestral (the model's chain), remdm (ancestral + ReMDM remasking, budget evaluate.remdm_eta), "
            "confidence (MaskGIT/LLaDA order) or gibbs (BERT-Mouth); sets evaluate.sampler."
        ),
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Top-k, 0 = off; sets evaluate.top_k.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus mass; sets evaluate.top_p.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Temperature; sets evaluate.temperature.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed; sets evaluate.sample_seed.")] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N; sets evaluate.device."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the sentences to this file instead of stdout.", dir_okay=False),
    ] = None,
    track: Annotated[bool, typer.Option("--track", help="Record the samples as an MLflow run.")] = False,
) -> None:
    given = {
        "length": length,
        "steps": steps,
        "sampler": sampler,
        "top_k": top_k,
        "top_p": top_p,
        "temperature": temperature,
        "seed": seed,
        "device": device,
    }
    values = {generate.OPTIONS[name]: value for name, value in given.items() if value is not None}
    summary = run_stage(
        generate,
        params,
        set_,
        root,
        values=values,
        quiet_transformers=True,
        model_dir=model,
        num=num,
        prompts=prompt,
        infills=infill,
        input_file=input_file,
        output_format=output_format,
        output=output,
        track=track,
    )
    if output is None:
        for line in summary["lines"]:
            typer.echo(line)
    else:
        typer.echo(f"wrote {len(summary['lines'])} sentences to {output}", err=True)


@app.command("params")
def params_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """Print the resolved params (file + --set overrides, validated, defaults filled in) as YAML."""
    import yaml

    with user_errors():
        p, _ = resolve(params, set_, root)
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False).rstrip("\n"))


@app.command("mlflow-ui")
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


@app.command("mlflow-server")
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


@app.command("publish")
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


def main() -> None:
    app(prog_name="dbert")


if __name__ == "__main__":
    main()
