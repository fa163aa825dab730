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

from pathlib import Path
from typing import Annotated

import typer

from stages import (
    cli_ablation,
    cli_generate,
    cli_mlflow,
    evaluate,
    prepare,
    samplers,
    schedule,
    token_stats,
    train,
    tune,
)
from stages.console import user_errors
from stages.invoke import echo_summary, resolve, run_stage, stage_help
from stages.options import ExperimentOption, ParamsOption, RootOption, SetOption, with_experiment

app = typer.Typer(
    name="dbert",
    help="DiffusionBERT pipeline: prepare -> token-stats -> schedule -> train -> evaluate -> samplers (each a DVC stage "
    "and an MLflow run), plus generate, tune, ablation, params, mlflow-ui and mlflow-server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


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


app.command("ablation", help=cli_ablation.HELP)(cli_ablation.ablation_command)
app.command("generate", help=cli_generate.HELP)(cli_generate.generate_command)


@app.command("params")
def params_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """Print the resolved params (file + --set overrides, validated, defaults filled in) as YAML."""
    import yaml

    with user_errors():
        p, _ = resolve(params, set_, root)
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False).rstrip("\n"))


app.command("mlflow-ui")(cli_mlflow.mlflow_ui_command)
app.command("mlflow-server")(cli_mlflow.mlflow_server_command)
app.command("publish")(cli_mlflow.publish_command)


def main() -> None:
    app(prog_name="dbert")


if __name__ == "__main__":
    main()
