"""`dbert`: one command per pipeline stage (the same code `dvc repro` runs), plus generate,
tune, params and mlflow-ui.

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

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.config import Params, load_params

app = typer.Typer(
    name="dbert",
    help="DiffusionBERT pipeline: prepare -> token-stats -> schedule -> train -> evaluate (each a DVC stage "
    "and an MLflow run), plus generate, tune, ablation, params and mlflow-ui.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

ParamsOption = Annotated[
    Optional[Path],
    typer.Option("--params", metavar="PATH", help="Params file (default: <root>/params.yaml).", dir_okay=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", metavar="KEY=VALUE",
                 help="Override a param, e.g. train.lr=3e-4 (the syntax of `dvc exp run -S`); repeatable."),
]
RootOption = Annotated[
    Optional[Path],
    typer.Option("--root", metavar="DIR", file_okay=False,
                 help="Project checkout to read from and write to (default: the nearest directory at or above "
                 "the current one with dvc.yaml or params.yaml)."),
]

# Errors that are the user's input, not a bug: one line, exit code 1.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# By name, so that the CLI never imports Ray or yaml's internals to classify: PlacementError (the
# cluster cannot hold the workers), TrainingError (a training run failed; its cause is in the
# message), YAML syntax errors in a params file.
USER_ERROR_NAMES = {"PlacementError", "TrainingError", "YAMLError"}


def default_root(start: Path | None = None) -> Path:
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / "params.yaml").is_file():
            return candidate
    return here


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    return any(cls.__name__ in USER_ERROR_NAMES for cls in type(err).__mro__)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn input errors (params, corpus, model, schedule, missing files, placement) into
    `error: <message>` + exit 1; anything else is a bug and keeps its traceback.

    Also the command's stop boundary: SIGTERM / SIGINT / SIGHUP unwind it (`pipeline.signals`),
    so MLflow runs end KILLED and no half-written output stays; then one line `stopped by
    SIGTERM` on stderr and exit code 128 + the signal (143, 130, 129)."""
    from pipeline.signals import terminate_on_signals

    stop = None
    try:
        with terminate_on_signals() as stop:
            yield
    except KeyboardInterrupt:  # Terminated, or Ray's KeyboardInterrupt standing in for it
        typer.echo(f"stopped by {stop.signame if stop and stop.signame else 'SIGINT'}", err=True)
        raise typer.Exit(stop.exit_code if stop else 130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as err:  # noqa: BLE001 - classified below
        if not _is_user_error(err) or os.environ.get("DBERT_DEBUG"):
            raise
        typer.echo(f"error: {one_line(err)}", err=True)
        raise typer.Exit(1) from None


def resolve(params_path: Path | None, overrides: list[str] | None, root: Path | None) -> tuple[Params, Path]:
    root = Path(root).expanduser().resolve() if root is not None else default_root()
    path = Path(params_path).expanduser() if params_path is not None else root / "params.yaml"
    return load_params(path, list(overrides or [])), root


def quiet_hf() -> None:
    """No tqdm bars from transformers (loading and saving weights) under our own bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


class RichProgress:
    """`progress(task, advance, total)` drawn as rich bars on stderr (silent when not a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=not console.is_terminal,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "RichProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, task: str, advance: int = 1, total: int | None = None) -> None:
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(str(task), total=total)
        elif total is not None:
            self._progress.update(self._tasks[task], total=total)
        self._progress.advance(self._tasks[task], advance)


def _echo_summary(summary: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in summary and summary[key] is not None:
            typer.echo(f"{key}: {summary[key]}")


@app.command("prepare")
def prepare_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """Read the corpus and tokenize it.

    Reads params data.* and model.name_or_path (the tokenizer), and the corpus (data.source; the LM1B
    mirror data.mirror_dir is relative to the project root, $DBERT_LM1B_DIR overrides it). Writes
    data/prepared/{train,validation,test}/, data/prepared/test.txt and data/prepared/meta.json.
    """
    from stages import prepare

    with user_errors():
        p, r = resolve(params, set_, root)
        with RichProgress() as bar:
            summary = prepare.run(p, r, progress=bar)
    _echo_summary(summary, ("output", "source", "train_sequences", "validation_sequences", "test_sequences"))


@app.command("token-stats")
def token_stats_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """Count tokens of the training split: information per vocabulary id and the length histogram.

    Reads data/prepared/train/ and data/prepared/meta.json. Writes data/token_stats/counts.npy,
    summary.json, lengths.npy and the metrics file outputs/token_stats.json.
    """
    from stages import token_stats

    with user_errors():
        p, r = resolve(params, set_, root)
        summary = token_stats.run(p, r)
    _echo_summary(summary, ("output", "metrics", "sentences", "tokens", "ids_seen", "unigram_entropy_bits"))


@app.command("schedule")
def schedule_command(params: ParamsOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """Build and check the noise schedule; draw alpha_t(v).

    Reads params diffusion.schedule/num_timesteps/spindle_lambda/loglinear_eps and data/token_stats/.
    Writes data/schedule/schedule.json (description, monotonicity limit and an exhaustive check over
    every id and step), alpha_curves.csv and alpha_curves.png.
    """
    from stages import schedule

    with user_errors():
        p, r = resolve(params, set_, root)
        with RichProgress() as bar:
            summary = schedule.run(p, r, progress=bar)
    _echo_summary(summary, ("output", "schedule", "num_timesteps", "monotone", "limit", "lambda_times_max_h"))


@app.command("train")
def train_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last run from its latest checkpoint.")] = False,
) -> None:
    """Train the denoiser with Ray Train (train.num_workers workers; 0 = in this process).

    Reads params model.*, diffusion.*, train.*, data.max_seq_len; data/prepared/{train,validation}/,
    data/token_stats/ and data/schedule/schedule.json. Writes models/final/ (Hugging Face export),
    outputs/train/metrics.json, history.csv and curve.png; checkpoints under checkpoints/.
    """
    from stages import train

    with user_errors():
        p, r = resolve(params, set_, root)
        quiet_hf()
        with RichProgress() as bar:
            summary = train.run(p, r, resume=resume, progress=bar)
    _echo_summary(summary, ("model", "step", "val_bound", "val_ppl", "tokens_per_s", "precision", "mlflow_run_id"))


@app.command("evaluate")
def evaluate_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Export directory (default: models/final).")] = None,
) -> None:
    """Perplexity bound on the test split, BLEU / Self-BLEU of samples, plots.

    Reads params evaluate.*, model.*, diffusion.num_timesteps/hybrid_lambda (the untrained model for
    comparison), data.max_seq_len, data.source, train.packed; models/final/, data/prepared/test/,
    data/prepared/test.txt, data/token_stats/lengths.npy. Writes outputs/evaluate/metrics.json,
    report.json, samples.txt and plots/*.png (bound, quality vs diversity, steps table).
    """
    from stages import evaluate

    with user_errors():
        p, r = resolve(params, set_, root)
        quiet_hf()
        with RichProgress() as bar:
            summary = evaluate.run(p, r, model_dir=model, progress=bar)
    for line in evaluate.summary_lines(summary):
        typer.echo(line)
    _echo_summary(summary, ("outputs",))


@app.command("tune")
def tune_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    apply: Annotated[bool, typer.Option("--apply", help="Run the proposal as `dvc exp run --temp -S ...` (the "
                                        "workspace stays as it is; `dvc exp apply` adopts it).")] = False,
) -> None:
    """Ray Tune over tune.* (time designs, and lr / lambda when listed); opt-in, not a DVC stage.

    Reads params tune.* and what training reads; data/prepared/ and data/token_stats/. Writes
    outputs/tune/ (trials, best_params.yaml) and a parent MLflow run with one nested run per trial.
    Prints the proposal; never edits params.yaml (--apply runs it as a DVC experiment in a temporary
    copy: compare with `dvc exp show`, adopt with `dvc exp apply <name>`).
    """
    from stages import tune

    def show(summary: dict) -> None:
        typer.echo(f"# proposal ({summary['proposal_path']}):")
        typer.echo(summary["proposal_text"].rstrip("\n"))
        if not apply:
            typer.echo("# apply it with: dbert tune --apply, or: dvc exp run --temp "
                       + " ".join(f"-S {o}" for o in summary["overrides"]))

    with user_errors():
        p, r = resolve(params, set_, root)
        tune.run(p, r, apply=apply, on_proposal=show)


@app.command("ablation")
def ablation_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    rows: Annotated[Optional[list[str]], typer.Option(
        "--row", metavar="NAME", help="Run only this row (repeatable; default: ablation.rows).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete outputs/ablation first instead of resuming.")] = False,
    background: Annotated[bool, typer.Option(
        "--background", help="Detach: run in a new session, log to outputs/ablation/run.log, print the pid.")] = False,
) -> None:
    """PAPER §8's rows (D3PM, DiffusionBERT linear/spindle x time designs, BERT-Mouth, the leaky
    spindle_paper, a packed row), one budget each (ablation.train_steps), and one report.

    Reads every params group plus ablation.*; data/prepared/ and data/token_stats/ (run
    `dvc repro token_stats` first). Writes outputs/ablation/rows/<row>/ and
    outputs/ablation/report/ (report.md, report.json, curves.png, quality_diversity.png); one
    MLflow parent run with a child per row. Run it again to resume: finished rows are reused and an
    interrupted one continues from its checkpoint.
    """
    import sys
    import time

    from stages import ablation

    if background:
        with user_errors():
            p, r = resolve(params, set_, root)  # fail here, not in the detached process
            from pipeline.ablation.rows import plan

            plan(p, rows)
            out = r / "outputs" / "ablation"
            out.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "stages.cli", "ablation", "--root", str(r)]
            command += [f"--params={params}"] if params else []
            command += [f"--set={item}" for item in set_ or []] + [f"--row={row}" for row in rows or []]
            command += ["--fresh"] if fresh else []
            with open(out / "run.log", "ab") as log:
                child = subprocess.Popen(command, cwd=r, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            (out / "run.pid").write_text(f"{child.pid}\n", encoding="utf-8")
        typer.echo(f"ablation running in the background, pid {child.pid}; follow: tail -f {out / 'run.log'}; "
                   f"stop: kill {child.pid} (run `dbert ablation` again to resume)")
        return

    def on_row(index: int, total: int, key: str, status: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        typer.echo(f"[{stamp}] row {index + 1}/{total} {key}: {status}", err=True)

    with user_errors():
        p, r = resolve(params, set_, root)
        quiet_hf()
        with RichProgress() as bar:
            summary = ablation.run(p, r, only=rows, fresh=fresh, progress=bar, on_row=on_row)
    typer.echo(f"report: {summary['report']}/report.md")
    typer.echo(f"mlflow_run_id: {summary['mlflow_run_id']}")
    for number, verdict in summary["claims"].items():
        typer.echo(f"claim {number}: {verdict}")


@app.command("generate")
def generate_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Export directory (default: models/final).")] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Number of sentences.")] = 8,
    length: Annotated[Optional[int], typer.Option(
        help="WordPieces per sentence; 0 = draw from the training length histogram (32 without one). "
        "Default: evaluate.sample_length.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Reverse steps (default: evaluate.sample_steps).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Top-k, 0 = off (default: evaluate.top_k).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus mass (default: evaluate.top_p).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Temperature (default: evaluate.temperature).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (default: evaluate.sample_seed).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the sentences to this file "
                                                   "instead of stdout.", dir_okay=False)] = None,
    track: Annotated[bool, typer.Option("--track", help="Record the samples as an MLflow run.")] = False,
) -> None:
    """Sample sentences from an exported model and print them, one per line.

    Reads the export directory (model, tokenizer, schedule) and data/token_stats/lengths.npy (for
    length 0). Writes only --output (atomically) when given.
    """
    from stages import generate

    with user_errors():
        p, r = resolve(params, set_, root)
        quiet_hf()
        with RichProgress() as bar:
            summary = generate.run(p, r, model_dir=model, num=num, length=length, steps=steps, top_k=top_k,
                                   top_p=top_p, temperature=temperature, seed=seed, output=output, track=track,
                                   progress=bar)
    if output is None:
        for text in summary["texts"]:
            typer.echo(text)
    else:
        typer.echo(f"wrote {len(summary['texts'])} sentences to {output}", err=True)


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
        "127.0.0.1"),
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Start the MLflow UI on the project's tracking store (mlflow.db and mlartifacts/ at the project root)."""
    from pipeline.project import project_root
    from pipeline.tracking import ui_command

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


def main() -> None:
    app(prog_name="dbert")


if __name__ == "__main__":
    main()
