"""mlx-lm's stream_generate works unchanged with an InfiniCache."""

import mlx.core as mx
import pytest
from mlx_lm import stream_generate
from tiny import VOCAB, save_base

import infini_mlx


@pytest.mark.parametrize(
    "form", [{}, {"memory": "normalized", "conv_size": 3}], ids=["paper", "normalized+conv"]
)
def test_stream_generate_matches_greedy_loop(tmp_path, form):
    save_base(tmp_path / "base", "llama", seed=3)
    model, tokenizer = infini_mlx.load(tmp_path / "base", infini={"segment_len": 8, **form})
    for i, layer in enumerate(model.layers):  # memory matters
        a = layer.self_attn
        a.gate = mx.random.normal((4,), key=mx.random.key(i))
        for name in ("k_conv1d", "q_conv1d", "b_proj"):
            if name in a:
                a[name].weight = mx.random.normal(a[name].weight.shape, key=mx.random.key(10 + i))
    prompt = mx.random.randint(2, VOCAB, (29,), key=mx.random.key(9)).tolist()
    n_new = 20  # decoding crosses several segment boundaries

    # A plain greedy loop over the streaming forward.
    cache = model.make_cache()
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1]
    expected = []
    for _ in range(n_new):
        t = mx.argmax(logits).item()
        expected.append(t)
        if t in tokenizer.eos_token_ids:  # stream_generate stops there too
            break
        logits = model(mx.array([[t]]), cache=cache)[0, -1]

    cache = model.make_cache()
    got = [
        r.token
        for r in stream_generate(
            model, tokenizer, prompt, max_tokens=n_new,
            prompt_cache=cache, prefill_step_size=5,  # chunks cross segment boundaries
        )
    ]
    assert got == expected and len(got) >= 8
    # generate_step computes one step ahead of what it yields.
    assert cache[0].offset in (len(prompt) + len(got) - 1, len(prompt) + len(got))
