"""``infini convert``: import a PyTorch / Hugging Face checkpoint as an infini-mlx model."""

from pathlib import Path
from typing import Optional

import typer
from infini_mlx.converters import ConversionError
from infini_mlx.converters import convert as run_convert


def convert(
    src: Path = typer.Argument(
        ..., help="Checkpoint directory, or a .gguf file, to read (it is never modified)."
    ),
    dst: Path = typer.Argument(..., help="Model directory to create."),
    from_: Optional[str] = typer.Option(
        None, "--from", help="Force the format: hf, beomi, jlamprou, nanotron or gguf (default: detected)."
    ),
    segment_len: Optional[int] = typer.Option(
        None, "--segment-len", min=1, help="Segment length N, when the checkpoint does not record it (or to override)."
    ),
    gate_init: Optional[float] = typer.Option(
        None, "--gate-init", help="Initial gate logit of a plain model's new gates "
        "(default -12: the untrained memory weighs sigmoid(-12) = 6e-6)."
    ),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the base weights with mlx-lm."),
    q_bits: int = typer.Option(4, "--q-bits", min=1, max=8, help="Bits per weight when quantizing."),
    q_group_size: int = typer.Option(64, "--q-group-size", min=1, help="Group size when quantizing."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float16, bfloat16 or float32 (default: the config's torch_dtype; "
        "for a GGUF file float32 on Linux, float16 on macOS)."
    ),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Directory to copy tokenizer files from, when SRC has none."
    ),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
):
    """Convert a PyTorch or Hugging Face checkpoint into an infini-mlx model directory.

    Reads safetensors and zip-format torch.save files (.bin/.pt/.pth, sharded
    with *.index.json) without torch; pickles are never executed (only tensors
    and plain containers are accepted). Formats, detected from the files:

    \b
      hf        plain Hugging Face model (Llama, Mistral, Qwen2/3, Qwen2-MoE,
                Gemma 1-3, Phi-3): converted and upcycled with new gates
      beomi     Hugging Face-style Infini checkpoint (Beomi InfiniTransformer
                Llama/Gemma, gemma-2B-10M): self_attn.gate [1,H,1,1]; linear
                memory, first segment reads nothing, segment-local RoPE,
                tiled GQA memories
      jlamprou  jlamprou's Qwen1.5-MoE Infini: per-layer beta, stale M/z
                buffers dropped, RoPE before the memory, eps 1e-8
      nanotron  nanotron Infini Llama directory (model_config.json,
                config.yaml, tensor-parallel shards, fused qkv,
                balance_factors): delta rule, gate activation and segment
                length from config.yaml
      gguf      a llama.cpp .gguf file (llama/Mistral, Qwen2/3, Gemma 1-3):
                dequantized (K-quants need the gguf package), tokenizer and
                chat template rebuilt from its metadata, upcycled

    The semantics that change the math are recorded in config.json ("infini")
    and honoured by infini_mlx.load. Example:

    \b
      infini convert ./Meta-Llama-3-8B ./llama3-infini --segment-len 2048 -q
      infini convert SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-infini
    """
    infini = {}
    if segment_len is not None:
        infini["segment_len"] = segment_len
    if gate_init is not None:
        infini["gate_init"] = gate_init
    try:
        summary = run_convert(
            src, dst, fmt=from_, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
            force=force, infini=infini, dtype=dtype, tokenizer=tokenizer,
        )
    except ConversionError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    except OSError as e:  # disk full, permissions
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    except Exception as e:  # a bug: still one line; infini_mlx.converters.convert() shows the traceback
        typer.echo(f"error: unexpected {type(e).__name__}: {e}".splitlines()[0], err=True)
        raise typer.Exit(1)
    typer.echo(str(summary))
