"""`infini train`: train or fine-tune an Infini model; resumes from its run directory."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def _check(option: str, ok: bool, message: str):
    if not ok:
        raise typer.BadParameter(message, param_hint=f"'{option}'")


def _ints(option: str, s: str, least: int = 1):
    parts = [x.strip() for x in s.split(",")]
    _check(option, all(x.isdigit() and int(x) >= least for x in parts), f"{s!r}: whole numbers >= {least}, comma-separated")
    return [int(x) for x in parts]


def _layers(option: str, s: str):
    return sorted(set(_ints(option, s, least=0)))


def _lengths(option: str, s: str):
    from infini_mlx.passkey import parse_length

    try:
        return [parse_length(x) for x in s.split(",")]
    except ValueError as e:
        _check(option, False, str(e))


def _pair(option: str, s: str):
    p = _ints(option, s)
    _check(option, len(p) == 2 and p[0] <= p[1], f"{s!r}: give min,max with min <= max, e.g. 1,4")
    return p


def _object(option: str, s: str):
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        d = e
    _check(option, isinstance(d, dict), f"{s!r} is not a JSON object")
    return d


def _mix(s: str):
    from infini_mlx.train import TASKS

    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        _check("--mix", k.strip() in TASKS, f"unknown task {k.strip()!r}; known: {', '.join(TASKS)}")
        try:
            out[k.strip()] = float(v or 1)
        except ValueError:
            out[k.strip()] = -1.0
        _check("--mix", out[k.strip()] >= 0, f"{part!r}: a task's weight is a number >= 0")
    _check("--mix", sum(out.values()) > 0, "give at least one task a weight above 0")
    return out


def train(
    out: Annotated[Path, typer.Argument(help="Run directory: checkpoints and log; an existing run resumes.")],
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="Fine-tune this model (any that infini_mlx.load reads); default: a new one."),
    ] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option(help="Tokenizer directory of a new model (scripts/train_tokenizer.py).")
    ] = None,
    arch: Annotated[
        str, typer.Option(help='JSON overrides of a new model\'s Llama config, e.g. \'{"hidden_size": 256}\'.')
    ] = "{}",
    infini: Annotated[
        str, typer.Option(help='JSON "infini" block, e.g. \'{"segment_len": 128, "update": "delta"}\'.')
    ] = "{}",
    steps: Annotated[int, typer.Option(min=1, help="Train until this many steps in total.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step.")] = 8,
    segments: Annotated[str, typer.Option(help="min,max segments per sequence at the start.")] = "1,4",
    segments_final: Annotated[
        Optional[str], typer.Option(help="min,max segments at the end of the curriculum.")
    ] = None,
    curriculum_steps: Annotated[
        int, typer.Option(min=0, help="Steps over which the segment range widens.")
    ] = 0,
    mix: Annotated[
        str, typer.Option(help="Task probabilities, e.g. lm=0.5,passkey=0.25,needle=0.25.")
    ] = "lm=0.5,passkey=0.25,needle=0.25",
    answer_weight: Annotated[float, typer.Option(min=0, help="Loss weight of answer tokens.")] = 10.0,
    loss_positions: Annotated[
        int,
        typer.Option(min=0, help="Score only the answers plus random targets, this many per sequence (0: all)."),
    ] = 0,
    lr: Annotated[float, typer.Option(help="Learning rate of the body (AdamW).")] = 1e-3,
    gate_lr: Annotated[float, typer.Option(help="Learning rate of the gates (Adam, no weight decay).")] = 1e-2,
    memory_lr: Annotated[
        Optional[float],
        typer.Option(help="Learning rate of the memory's convolutions, write strengths and read-out norm (default: --lr)."),
    ] = None,
    conv_lr: Annotated[
        Optional[float],
        typer.Option(help="Learning rate of the memory's convolution taps alone (default: --memory-lr)."),
    ] = None,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay of the body.")] = 0.01,
    warmup: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 50,
    decay_steps: Annotated[
        int, typer.Option(min=0, help="Cosine decay to 10% over this many steps (0: constant).")
    ] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 100,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between retrieval probes (0: off).")] = 0,
    eval_segments: Annotated[str, typer.Option(help="Segment counts the probe measures.")] = "2,8,32",
    eval_passkey: Annotated[
        Optional[str],
        typer.Option(help="Prompt lengths (e.g. 32k,128k) at which each evaluation also runs greedy passkey retrieval."),
    ] = None,
    eval_trials: Annotated[int, typer.Option(min=1, help="Prompts per depth of --eval-passkey.")] = 4,
    carry_state: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Probability that a batch starts from the memory the last one ended with."),
    ] = 0.0,
    carry_ask: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="With a carried memory, probability that a row asks a fact it holds from earlier batches."),
    ] = 0.0,
    carry_ask_chain: Annotated[
        bool,
        typer.Option("--carry-ask-chain", help="--carry-ask asks any fact written since the memory was last empty, not only the last needle's."),
    ] = False,
    carry_ask_key: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Of --carry-ask's questions, the share that asks the pass key a row's memory holds, as infini query asks it."),
    ] = 0.0,
    chain_new_names: Annotated[
        bool,
        typer.Option("--chain-new-names", help="With --carry-ask-chain, a needle's names are ones its row's memory does not hold yet: no name is written twice."),
    ] = False,
    qa_sentence: Annotated[
        bool,
        typer.Option("--qa-sentence", help="qa puts the key line after a sentence of the book, not after any token."),
    ] = False,
    answer_shift: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of rows that go on with book text after their last answer, so questions fall anywhere in a segment."),
    ] = 0.0,
    qa_distractors: Annotated[
        int,
        typer.Option(min=0, help="qa rows also hold this many numbers that are not the key (fact lines, chapter headings)."),
    ] = 0,
    write_penalty: Annotated[
        float,
        typer.Option(min=0.0, help="Add this times the mean write strength of the normalised memory to the loss."),
    ] = 0.0,
    write_leak: Annotated[
        float,
        typer.Option(min=0.0, help="With write_gate clip: the clip's backward slope where it writes nothing, so dead writes can revive."),
    ] = 0.0,
    key_overlap: Annotated[
        float,
        typer.Option(min=0.0, help="Add this times the write-weighted mean squared cosine of written keys to the loss."),
    ] = 0.0,
    write_penalty_layers: Annotated[
        Optional[str],
        typer.Option(help="Layers (from 0, e.g. 0,1,2) --write-penalty acts on (default: every layer)."),
    ] = None,
    write_leak_layers: Annotated[
        Optional[str],
        typer.Option(help="Layers (from 0, e.g. 3) --write-leak acts on (default: every layer)."),
    ] = None,
    key_digits: Annotated[
        str,
        typer.Option(
            help="Training keys: 'paper' (1-50,000, as evaluated), 'uniform' (1-5 digits equally often) or 'mixed' (half each)."
        ),
    ] = "paper",
    needle_facts: Annotated[
        int, typer.Option(min=1, help="Most facts in a training needle sequence (fewer where it is short).")
    ] = 4,
    needle_shared: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Probability that a needle's values share their first digits (keys by name)."),
    ] = 0.0,
    first_fact_weight: Annotated[
        float,
        typer.Option(min=0.0, help="Multiply the answer weight of the fact a needle sequence writes first by this."),
    ] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the initial weights and the data stream.")] = 0,
    freeze_base: Annotated[
        bool,
        typer.Option("--freeze-base", help="Train only the memory's parameters (gates too) of --model."),
    ] = False,
    lora_rank: Annotated[
        int,
        typer.Option(min=0, help="LoRA rank on the attention projections (base frozen; 0: none)."),
    ] = 0,
    lora_scale: Annotated[float, typer.Option(help="mlx-lm's LoRA scale.")] = 20.0,
    books: Annotated[
        Optional[str], typer.Option(help="Training book files to use, comma-separated (default: all five).")
    ] = None,
    books_dir: Annotated[
        Optional[Path], typer.Option(help="Where the books are (default: ../shared/data/books beside the checkout, or $INFINI_BOOKS).")
    ] = None,
    export: Annotated[
        Optional[Path], typer.Option(help="When done, also save the model to this directory.")
    ] = None,
):
    """Segment-recurrent training with backprop through the memory, resumable."""
    from infini_mlx import load, save
    from infini_mlx.train import TrainArgs
    from infini_mlx.train import train as run

    _check("--lr", lr > 0, f"{lr} is not a learning rate: a number > 0")
    _check("--gate-lr", gate_lr > 0, f"{gate_lr} is not a learning rate: a number > 0")
    _check("--key-digits", key_digits in ("paper", "uniform", "mixed"), f"{key_digits!r} is not 'paper', 'uniform' or 'mixed'")
    _check("--memory-lr", memory_lr is None or memory_lr > 0, f"{memory_lr} is not a learning rate: a number > 0")
    _check("--conv-lr", conv_lr is None or conv_lr > 0, f"{conv_lr} is not a learning rate: a number > 0")
    _check("--model", model is not None or not (freeze_base or lora_rank), "--freeze-base and --lora-rank fine-tune a --model")
    args = TrainArgs(
        out=str(out),
        init=model,
        tokenizer=str(tokenizer) if tokenizer else None,
        arch=_object("--arch", arch),
        infini=_object("--infini", infini),
        steps=steps,
        batch_size=batch_size,
        segments=_pair("--segments", segments),
        segments_final=_pair("--segments-final", segments_final) if segments_final else None,
        curriculum_steps=curriculum_steps,
        mix=_mix(mix),
        answer_weight=answer_weight,
        loss_positions=loss_positions,
        lr=lr,
        gate_lr=gate_lr,
        memory_lr=memory_lr,
        conv_lr=conv_lr,
        key_digits=key_digits,
        needle_facts=needle_facts,
        needle_shared=needle_shared,
        weight_decay=weight_decay,
        warmup=warmup,
        decay_steps=decay_steps,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        eval_segments=_ints("--eval-segments", eval_segments),
        eval_passkey=_lengths("--eval-passkey", eval_passkey) if eval_passkey else [],
        eval_trials=eval_trials,
        carry_state=carry_state,
        carry_ask=carry_ask,
        carry_ask_chain=carry_ask_chain,
        carry_ask_key=carry_ask_key,
        chain_new_names=chain_new_names,
        first_fact_weight=first_fact_weight,
        qa_sentence=qa_sentence,
        qa_distractors=qa_distractors,
        answer_shift=answer_shift,
        write_penalty=write_penalty,
        write_leak=write_leak,
        key_overlap=key_overlap,
        write_penalty_layers=_layers("--write-penalty-layers", write_penalty_layers) if write_penalty_layers else None,
        write_leak_layers=_layers("--write-leak-layers", write_leak_layers) if write_leak_layers else None,
        seed=seed,
        freeze_base=freeze_base,
        lora_rank=lora_rank,
        lora_scale=lora_scale,
    )
    if books_dir:
        args.books = str(books_dir)
    if books:
        args.book_names = [b.strip() for b in books.split(",")]
    ckpt = run(args, log=typer.echo)
    if export:
        m, tok, config = load(ckpt / "model", return_config=True)
        save(export, m, tok, config, overwrite=True)
        typer.echo(f"saved {export}")
