"""The `infini` command: read books into a fixed-size memory, then query or summarize them."""

import json
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from enum import Enum
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from infini_mlx import (
    InfiniSession,
    InputError,
    ModelNotFoundError,
    StateFileError,
    UntrainedMemoryWarning,
    openblas,
)
from infini_mlx.reading import check_text_file, fingerprint
from infini_mlx.utils import resolve_model_path

from .convert import convert
from .info import format_info, model_info, state_info
from .passkey import passkey
from .progress import ReadProgress, peak_rss_bytes, rss_bytes
from .train import train

DEBUG_ENV = "INFINI_DEBUG"


def _echo_warning(message, category, filename, lineno, file=None, line=None):
    typer.echo(f"warning: {message}", err=True)


def _usage_error(e: Exception) -> bool:
    """Click's usage errors (bad values, unknown options), not its "no arguments: help"."""
    names = [c.__name__ for c in type(e).__mro__]
    return "UsageError" in names and "NoArgsIsHelpError" not in names


def _one_line(e) -> typer.Exit:
    ctx = getattr(e, "ctx", None)
    see = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    typer.echo(f"error: {e.format_message().rstrip('.')}{see}", err=True)
    return typer.Exit(e.exit_code)


class _Tidy:
    """Usage errors in one line; help without a type for flags, and usage lines
    with FILE, not {file}."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except Exception as e:
            if _usage_error(e):
                raise _one_line(e) from None
            raise

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if p.metavar is None and isinstance(p, TyperArgument):
                p.metavar = p.name.upper()
            elif p.metavar is None and getattr(p, "is_flag", False):
                p.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):
        pieces = super().collect_usage_pieces(ctx)
        args = [p.metavar for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        return [x[1:-1] if x[1:-1] in args and x[0] == "{" else x for x in pieces]


class _Command(_Tidy, TyperCommand):
    pass


class _Group(_Tidy, TyperGroup):
    """Turns every error into one line on stderr and a non-zero exit.

    ``INFINI_DEBUG=1`` lets the traceback through instead.
    """

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _echo_warning
            try:
                return super().invoke(ctx)
            except Exception as e:
                if _usage_error(e):  # raised by a command's own checks of its options
                    raise _one_line(e) from None
                # Typer's own (Exit, Abort, help) are Typer's to print; it
                # vendors click in recent versions, so they are told by module.
                if type(e).__module__.startswith(("typer", "click")):
                    raise
                if isinstance(e, BrokenPipeError):  # `| head`: Typer exits quietly
                    raise
                if os.environ.get(DEBUG_ENV):
                    raise
                typer.echo(f"error: {_describe(e)}", err=True)
                raise typer.Exit(1)
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130)


def _describe(e: Exception) -> str:
    if isinstance(e, (InputError, StateFileError, ModelNotFoundError, OSError, ValueError)):
        msg = str(e) or type(e).__name__
        if isinstance(e, ModelNotFoundError) and "embedded" in msg:
            msg += " (--model names another: a local directory or a Hugging Face id)"
    else:
        msg = f"{type(e).__name__}: {e} (set {DEBUG_ENV}=1 for a traceback)"
    return " ".join(msg.split())  # one line


app = typer.Typer(
    cls=_Group,
    name="infini",
    help=(
        "Read book-length text into a fixed-size Infini-attention memory, "
        "then query or summarize it. Memory use does not grow with the text's length."
    ),
    epilog=(
        "Example: infini read book.txt -o book.state; "
        'infini query book.state "Who tells the story?"; '
        "infini summarize book.state. Set INFINI_DEBUG=1 to see tracebacks."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        v = {p: version(p) for p in ("infini-mlx", "mlx", "mlx-lm")}
        typer.echo(f"infini-mlx {v['infini-mlx']} (mlx {v['mlx']}, mlx-lm {v['mlx-lm']})")
        raise typer.Exit()


@app.callback()
def _options(
    _: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = False,
):
    pass


# Options shared by several commands.
Model = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Model: a local directory or a Hugging Face id. Default: the embedded "
        "model, or for a state file the model that wrote it.",
        show_default=False,
    ),
]
SegmentLen = Annotated[
    Optional[int],
    typer.Option(
        "--segment-len", min=1,
        help="Tokens per segment. Default: the model's, or the state file's.",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
MaxTokens = Annotated[
    int, typer.Option("--max-tokens", "-m", min=1, max=1_000_000, help="Most tokens to generate.")
]
Temp = Annotated[float, typer.Option("--temp", min=0, help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[
    float, typer.Option("--top-p", min=0, max=1, help="Sampling top-p (1 keeps every token).")
]
MinP = Annotated[
    float, typer.Option("--min-p", min=0, max=1, help="Sampling min-p (0 keeps every token).")
]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sampling top-k (0 keeps every token).")]
Seed = Annotated[
    Optional[int], typer.Option("--seed", min=0, max=2**64 - 1, help="Random seed for sampling.")
]
Source = Annotated[
    Path,
    typer.Argument(
        help="A text file (read first; - for stdin) or a state file from `infini read` "
        "(answered at once).",
        show_default=False,
    ),
]
STDIN = "<stdin>"


class Strategy(str, Enum):
    memory = "memory"
    notes = "notes"


StrategyOpt = Annotated[
    Optional[Strategy],
    typer.Option(
        "--strategy",
        help="Keep what is read in the model's memory, or in notes the model writes "
        "every window (for a model whose memory was never trained).",
        show_default=False,
    ),
]
Output = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="The state file to write.", show_default=False),
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted reading from its last checkpoint.")
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the state file if it exists.")]


@contextmanager
def _input(path: Path):
    """``path``, or for ``-`` standard input spooled to a temporary file (read in pieces,
    and resumable like a file); and the name to record, None for a file's own."""
    if str(path) != "-":
        yield path, None
        return
    with tempfile.NamedTemporaryFile(prefix="infini-stdin-") as f:
        shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        f.flush()
        try:
            check_text_file(f.name)
        except InputError as e:
            raise InputError(str(e).replace(f.name, STDIN)) from None
        yield Path(f.name), STDIN


def _is_state(path: Path) -> bool:
    """A state file is a safetensors file: an 8-byte header length, then JSON."""
    if path.suffix in (".state", ".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 32


def _load(model, segment_len, strategy: Optional[str], auto: bool):
    """A new session and its strategy: ``strategy``, or with ``auto`` notes for a
    model whose memory was never trained (then its warning is not shown), else memory."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        session = InfiniSession.load(model, segment_len)
    trained = session.model.infini_config.memory_trained
    strategy = strategy or ("notes" if auto and not trained else "memory")
    for w in seen:
        if strategy == "memory" or not issubclass(w.category, UntrainedMemoryWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return session, strategy


def _check_output(file: Path, output: Optional[Path], resume: bool, force: bool, stdin: bool):
    if resume and force:
        raise InputError("--resume and --force exclude each other: continue, or start over")
    if output is None:
        if resume or force:
            raise InputError("--resume and --force need the state file: -o STATE")
        return
    if output.is_dir():
        raise InputError(f"{output} is a directory; name the state file to write")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory for the state file")
    if output.exists() and not stdin and output.resolve() == file.resolve():
        raise InputError(f"{output} is the input file; name another state file")
    if output.exists() and not (resume or force):
        raise InputError(f"{output} exists; --resume continues it, --force overwrites it")


def _reading(file, name, output, resume, force, checkpoint_every, model, segment_len, strategy,
             auto=False):
    """Read ``file`` (continuing ``output`` with --resume), checkpointing to ``output``.

    Returns the session, the tokens read now, the seconds it took, and where it resumed.
    """
    shown = name or str(file)
    if resume and output.exists():
        session = InfiniSession.restore(output, model, segment_len)
        if session.meta.get("source_sha") != fingerprint(file):
            raise InputError(
                f"{output} is a reading of {session.meta.get('source')}, not of {shown}; "
                "--force starts over"
            )
        if strategy and strategy != session.strategy:
            raise InputError(f"{output} holds a reading into {session.strategy}, not {strategy}; "
                             "--force starts over")
        strategy = session.strategy
    else:
        session, strategy = _load(model, segment_len, strategy, auto)
    start_tokens = session.tokens_read
    if session.complete and start_tokens:
        return session, 0, 0.0, start_tokens
    bar = ReadProgress(name or file.name)
    take = session.take_notes if strategy == "notes" else session.read
    every = 1 if strategy == "notes" else checkpoint_every  # a note takes seconds; its state is tiny
    tic = time.perf_counter()
    try:
        fed = take(file, progress=bar, checkpoint=output, checkpoint_every=every, name=name,
                   overwrite=force)
    except KeyboardInterrupt:
        bar.close()
        if output is not None and session.checkpointed:
            typer.echo(
                f"interrupted: {output} holds the last checkpoint "
                f"({session.checkpointed:,} tokens); continue with --resume",
                err=True,
            )
        elif output is not None:
            typer.echo("interrupted before the first checkpoint: nothing was saved", err=True)
        else:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    finally:
        bar.close()
    return session, fed, time.perf_counter() - tic, start_tokens


def _session(source: Path, model, segment_len, name=None, strategy=None, auto=False,
             output=None, resume=False, force=False):
    """A session that has read ``source``: restored from a state file, or read now."""
    if source.is_file() and _is_state(source):
        if output is not None:
            raise InputError(f"{source} is a state file already: -o saves a reading of a text file")
        session = InfiniSession.restore(source, model, segment_len)
        if strategy and strategy != session.strategy:
            raise InputError(f"{source} holds a reading into {session.strategy}, not {strategy}")
        if not session.complete:
            typer.echo(
                f"warning: {source} holds an interrupted reading "
                f"({session.tokens_read:,} tokens); finish it with --resume",
                err=True,
            )
        return session
    check_text_file(source)  # before the model loads
    return _reading(source, name, output, resume, force, 16, model, segment_len, strategy, auto)[0]


def _answer(session, stream, json_out: bool, key: str, extra: dict):
    """Print generated text as it comes and statistics on stderr, or one JSON object at the end."""
    parts = []
    for text in stream:
        parts.append(text)
        if not json_out:
            typer.echo(text, nl=False)
            sys.stdout.flush()
    r = session.response
    if not json_out:
        typer.echo()
        if r:  # as mlx_lm.generate --verbose
            typer.echo(
                f"{'=' * 10}\n"
                f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
                f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
                f"Peak memory: {r.peak_memory:.3f} GB",
                err=True,
            )
        if session.strategy == "notes":
            typer.echo(
                f"Notes: written from {len(session.notes)} notes on all "
                f"{session.tokens_read:,} tokens read",
                err=True,
            )
        elif not session.model.infini_config.memory_trained:
            typer.echo(
                f"Memory: never trained, so the answer saw only the last segment: "
                f"{session.tokens_seen:,} of the {session.tokens_read:,} tokens read",
                err=True,
            )
        return
    typer.echo(json.dumps({
        **extra,
        key: "".join(parts),
        "source": session.meta.get("source"),
        "complete": session.complete,
        "tokens_read": session.tokens_read,
        "memory_trained": bool(session.model.infini_config.memory_trained),
        "strategy": session.strategy,
        "tokens_seen": session.tokens_seen,
        "prompt_tokens": r.prompt_tokens if r else 0,
        "generation_tokens": r.generation_tokens if r else 0,
        "finish_reason": r.finish_reason if r else None,
        "prompt_tps": round(r.prompt_tps, 3) if r else None,
        "generation_tps": round(r.generation_tps, 3) if r else None,
        "peak_memory_gb": round(r.peak_memory, 3) if r else None,
    }))


@app.command(cls=_Command)
def read(
    file: Annotated[
        Path, typer.Argument(help="The text file to read (UTF-8; - for stdin).", show_default=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The state file to write.", show_default=False)
    ],
    resume: Resume = False,
    force: Force = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Segments between checkpoints.")
    ] = 16,
    strategy: StrategyOpt = None,
    model: Model = None,
    segment_len: SegmentLen = None,
    json_out: Json = False,
):
    """Stream a text file through the model into a state file.

    The file is read and tokenized in pieces, so memory does not grow with its
    size. The state is saved every few segments (an atomic write); after an
    interruption, the same command with --resume continues from the last
    checkpoint and ends with the state an uninterrupted reading would have.
    With --strategy notes the model writes a note every window instead (a
    checkpoint after each), for `infini summarize STATE`.
    """
    stdin = str(file) == "-"
    if not stdin:
        check_text_file(file)
    _check_output(file, output, resume, force, stdin)
    strategy = strategy.value if strategy else None
    with _input(file) as (path, name):
        session, fed, seconds, start_tokens = _reading(
            path, name, output, resume, force, checkpoint_every, model, segment_len, strategy
        )
    shown = name or str(path)
    if json_out:
        typer.echo(json.dumps({
            "state": str(output),
            "source": shown,
            "strategy": session.strategy,
            "tokens_read": session.tokens_read,
            "tokens_this_run": fed,
            "resumed_at": start_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(fed / seconds, 1) if seconds else None,
            "peak_rss_bytes": peak_rss_bytes(),
        }))
    elif fed == 0:
        typer.echo(f"{output} already holds all of {shown} ({session.tokens_read:,} tokens)")
    else:
        resumed = f", resumed at {start_tokens:,}" if start_tokens else ""
        into = f" in {len(session.notes)} notes" if session.strategy == "notes" else ""
        typer.echo(
            f"read {session.tokens_read:,} tokens of {shown}{into} into {output}{resumed} "
            f"({seconds:.1f} s, {fed / seconds:,.0f} tokens/s, "
            f"{rss_bytes() / 2**20:,.0f} MiB in use)"
        )


@app.command(cls=_Command)
def query(
    source: Source,
    question: Annotated[
        Optional[str], typer.Argument(help="The question to answer (or --prompt).", show_default=False)
    ] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option("--prompt", "-p", help="The question, as an option.", show_default=False),
    ] = None,
    max_tokens: MaxTokens = 256,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    top_k: TopK = 0,
    seed: Seed = None,
    model: Model = None,
    segment_len: SegmentLen = None,
    json_out: Json = False,
):
    """Answer a question about a book.

    From a text file the book is read first; from a state file written by
    `infini read` the answer starts at once, without reading again. The answer
    streams to stdout. Its quality depends entirely on the model.
    """
    if question is not None and prompt is not None:
        raise InputError("give the question once: as an argument or with --prompt")
    question = prompt if question is None else question
    if question is None:
        raise InputError("no question: give one as an argument or with --prompt")
    if not question.strip():
        raise ValueError("the question is empty")
    with _input(source) as (path, name):
        session = _session(path, model, segment_len, name)
    stream = session.stream_ask(
        question, max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed
    )
    _answer(session, stream, json_out, "answer", {"question": question})


@app.command(cls=_Command)
def summarize(
    source: Source,
    max_tokens: MaxTokens = 512,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    top_k: TopK = 0,
    seed: Seed = None,
    strategy: Annotated[
        Optional[Strategy],
        typer.Option(
            "--strategy",
            help="memory: summarize from the model's memory; notes: the model writes a note "
            "every window, merges them as they pile up, and summarizes the notes (works with "
            "any instruct model). Default: memory if the model's memory was trained, else notes.",
            show_default=False,
        ),
    ] = None,
    output: Output = None,
    resume: Resume = False,
    force: Force = False,
    model: Model = None,
    segment_len: SegmentLen = None,
    json_out: Json = False,
):
    """Summarize a book.

    From a text file the book is read first (-o keeps the reading in a state
    file, checkpointed as it goes; --resume continues an interrupted one); from
    a state file written by `infini read` or `infini summarize -o` the summary
    starts at once. It streams to stdout. (The paper summarized books with
    --temp 0.5 --top-p 0.95.) Its quality depends entirely on the model.
    """
    _check_output(source, output, resume, force, str(source) == "-")
    strategy = strategy.value if strategy else None
    with _input(source) as (path, name):
        session = _session(path, model, segment_len, name, strategy, auto=True,
                           output=output, resume=resume, force=force)
    stream = session.stream_summarize(
        max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed
    )
    _answer(session, stream, json_out, "summary", {})


@app.command(cls=_Command)
def info(
    target: Annotated[
        Optional[str],
        typer.Argument(
            help="A state file, a model directory or a Hugging Face id. "
            "Default: the embedded model.",
            show_default=False,
        ),
    ] = None,
    json_out: Json = False,
):
    """Show what a model or a state file holds, without loading weights."""
    path = Path(target) if target else None
    if path is not None and path.is_file():
        d = state_info(path)
    elif path is not None and not path.exists() and (path.suffix == ".state" or target.count("/") != 1):
        raise InputError(f"{target}: no such state file or model directory")
    else:
        d = model_info(resolve_model_path(target))
    typer.echo(json.dumps(d) if json_out else format_info(d))


# Commands written in their own modules.
app.command(cls=_Command)(convert)
app.command(cls=_Command)(passkey)
app.command(cls=_Command)(train)


def main():
    if openblas.STATUS == "missing":
        typer.echo(
            f"note: MLX computes ~30x slower here without OpenBLAS: {openblas.HINT} "
            f"({openblas.ENV}=0 hides this note)",
            err=True,
        )
    app()


if __name__ == "__main__":
    main()
