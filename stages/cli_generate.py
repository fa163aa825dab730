"""`dbert generate`: sentences from an exported model, unconditionally, after prompts or in the
gaps of templates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.vocab import GapLengthMethod
from stages import generate
from stages.invoke import run_stage, stage_help
from stages.options import ParamsOption, RootOption, SetOption

HELP = stage_help(
    generate,
    "Sample sentences from an exported model and print them, one per line: unconditionally, or continuing "
    "--prompt texts, or filling the [MASK] gaps of --infill templates (the given words never change).",
    "--model reads another export directory than models/final; lengths.npy only for --length 0 without a "
    "request. Example: dbert generate --infill 'the [MASK*3] is on the table .' --num 3. The sampling "
    "options set their params for this run and are checked by the params schema like --set. --output writes "
    "the sentences to a file (atomically) instead of stdout.",
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
    gap_length: Annotated[
        GapLengthMethod,
        typer.Option(
            "--gap-length",
            help="How a [MASK*?] gap gets its length: context (from how many WordPieces are shown and where the "
            "gap sits, under the training length histogram; no model call), bound (the model's bound, slow) or "
            "prior (the length histogram alone).",
        ),
    ] = "context",
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
        gap_length=gap_length,
    )
    if output is None:
        for line in summary["lines"]:
            typer.echo(line)
    else:
        typer.echo(f"wrote {len(summary['lines'])} sentences to {output}", err=True)
