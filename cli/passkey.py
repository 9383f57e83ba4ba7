"""`infini passkey`: passkey retrieval (and optionally needles and perplexity) of a model."""

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer


def _parse(option: str, parse, value: str):
    """``parse(value)``, its ValueError a usage error of ``option``."""
    try:
        return parse(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=f"'{option}'") from None


def _lengths(s: str):
    from infini_mlx.passkey import parse_length

    return [parse_length(x) for x in s.split(",") if x.strip()]


def _trials(s: str):
    t = [x.strip() for x in s.split(",")]
    if not all(x.isdigit() and int(x) >= 1 for x in t):
        raise ValueError(f"{s!r}: trials are whole numbers >= 1")
    return [int(x) for x in t]


def _trials_per_length(trials, lengths):
    if len(trials) == 1:
        return trials * len(lengths)
    if len(trials) != len(lengths):
        raise typer.BadParameter("give one value, or one per length", param_hint="'--trials'")
    return trials


def passkey(
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="Model directory or Hugging Face id (default: the embedded model)."),
    ] = None,
    lengths: Annotated[
        str, typer.Option(help="Prompt lengths in tokens of the model's tokenizer, e.g. 4k,32k,128k,1m.")
    ] = "4k,32k",
    depths: Annotated[
        str,
        typer.Option(help="Where the passkey sits: start,middle,end; numbers in [0,1]; or sweep:N."),
    ] = "start,middle,end",
    trials: Annotated[
        str, typer.Option(help="Trials per cell: one number, or one per length (e.g. 20,20,20,5).")
    ] = "3",
    seed: Annotated[int, typer.Option(min=0, help="Seed of every passkey and needle.")] = 0,
    batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Prompts streamed together, across depths (keep it fixed to compare memory across lengths).",
        ),
    ] = 15,
    needle: Annotated[
        Optional[str],
        typer.Option(help="Also multi-key needle retrieval (4 facts, one asked) at these lengths, e.g. 32k,128k."),
    ] = None,
    needle_trials: Annotated[int, typer.Option(min=1, help="Trials per needle length.")] = 20,
    perplexity: Annotated[
        bool, typer.Option("--perplexity", help="Also perplexity on the held-out books, memory on and off.")
    ] = False,
    ppl_tokens: Annotated[
        int, typer.Option(min=0, help="Tokens of each held-out book scored (0: the whole book).")
    ] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the results as JSON on stdout instead of the table.")
    ] = False,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Also write the results as JSON to this file.")
    ] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a length x depth heatmap PNG.")] = None,
):
    """Passkey retrieval accuracy by length and depth, in the paper's prompt format.

    Without options, a quick check: 4K and 32K tokens, 3 trials per cell (under
    a minute for the embedded model on 2 CPU cores). The full evaluation,
    --lengths 4k,32k,128k,1m --trials 20,20,20,5, takes about an hour there.
    """
    from infini_mlx import load
    from infini_mlx.passkey import (
        format_length,
        needle_eval,
        parse_depths,
        passkey_eval,
    )

    L = _parse("--lengths", _lengths, lengths)
    D = _parse("--depths", parse_depths, depths)
    T = _trials_per_length(_parse("--trials", _trials, trials), L)
    NL = _parse("--needle", _lengths, needle) if needle else []
    m, tok = load(model)

    def say(s):
        typer.echo(s, err=True)


    rows = []
    for length, n in zip(L, T):
        rows += passkey_eval(m, tok, [length], D, n, seed, batch, progress=say)
    result = {"model": model or "embedded", "seed": seed, "batch": batch, "passkey": rows}

    def echo(line):
        if not json_out:
            typer.echo(line)

    head = f"{'length':>8} " + " ".join(f"{d:>8}" for d in D) + f" {'trials':>6} {'tok/s':>8} {'MLX MB':>8} {'RSS MB':>8}"
    echo(head)
    for r in rows:
        cells = " ".join(f"{r['cells'][d]['accuracy']:>8.0%}" for d in D)
        n = r["cells"][next(iter(D))]["trials"]
        echo(
            f"{format_length(r['length']):>8} {cells} {n:>6} {r['tokens_per_s']:>8.0f}"
            f" {r['peak_memory_mb']:>8.1f} {r['peak_rss_mb']:>8.0f}"
        )

    if NL:
        result["needle"] = needle_eval(m, tok, NL, needle_trials, seed=seed, batch=batch, progress=say)
        for r in result["needle"]:
            echo(f"needle (4 facts, 1 asked) {format_length(r['length'])}: "
                       f"{r['cells']['random']['accuracy']:.0%} of {r['cells']['random']['trials']}")

    if perplexity:
        result["perplexity"] = _perplexities(m, tok, ppl_tokens)
        for book, p in result["perplexity"].items():
            echo(f"perplexity {book}: memory on {p['memory_on']:.2f}, off {p['memory_off']:.2f} ({p['tokens']} tokens)")

    if json_out:
        typer.echo(json.dumps(result))
    if output:
        output.write_text(json.dumps(result, indent=1))
    if plot:
        from infini_mlx.heatmap import render, write_png

        acc = np.array([[r["cells"][d]["accuracy"] for d in D] for r in rows])
        cols = [f"{100 * v:.0f}%" for v in D.values()]
        write_png(plot, render(acc, [format_length(r["length"]) for r in rows], cols))


def _perplexities(model, tokenizer, max_tokens: int):
    from infini_mlx.data import BOOKS_DIR, HELD_OUT_BOOKS, book_text
    from infini_mlx.passkey import memory_disabled, perplexity

    out = {}
    for name in HELD_OUT_BOOKS:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(
            book_text(BOOKS_DIR / name), add_special_tokens=False
        )
        ids = np.array(ids[: max_tokens or None], np.int32)
        on = perplexity(model, ids)
        with memory_disabled(model):
            off = perplexity(model, ids)
        out[name] = {"memory_on": on, "memory_off": off, "tokens": len(ids)}
    return out
