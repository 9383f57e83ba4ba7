"""A plain Hugging Face model converted here is what mlx-lm's own conversion gives,
weights and logits, quantized or not; with fully local gates it is that model."""

import mlx.core as mx
import pytest
from convert_helpers import FIXTURES, reference
from infini_mlx.converters import convert
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import load_model

import infini_mlx


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4-bit"])
def test_same_weights_and_logits_as_mlx_lm_convert(quantize, tmp_path):
    q = dict(quantize=quantize, q_bits=4, q_group_size=32)
    mlx_lm_convert(str(FIXTURES / "plain_llama_st"), str(tmp_path / "mlx_lm"), **q)
    ref_model, _ = load_model(tmp_path / "mlx_lm")
    ref = dict(mx.load(str(tmp_path / "mlx_lm" / "model.safetensors")))

    for src in ("plain_llama_st", "plain_llama_bin"):  # the .bin shards hold the same weights
        convert(FIXTURES / src, tmp_path / src, infini={"gate_init": -40.0}, **q)
        ours = dict(mx.load(str(tmp_path / src / "model.safetensors")))
        assert sorted(ours) == sorted(ref)
        assert all(ours[k].dtype == ref[k].dtype and mx.array_equal(ours[k], ref[k]) for k in ref)

        model, _, config = infini_mlx.load(tmp_path / src, return_config=True)
        assert (config.get("quantization") is not None) == quantize
        tokens, _, _ = reference("plain_llama")  # 29 tokens: one segment of 2048
        assert mx.allclose(model(tokens), ref_model(tokens), atol=1e-5, rtol=0)
