"""Training: loss goes down, gates get their own optimizer, a resumed run is the same run."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from infini_mlx import InfiniConfig, load
from infini_mlx.tasks import Pieces, info_line, passkey_prompt, plain_question
from infini_mlx.train import TRAIN_GATE_INIT, TrainArgs, new_model, train

TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)


def args(tmp, default_tokenizer, books_dir, **kw):
    base = dict(
        out=str(tmp),
        tokenizer=str(default_tokenizer),
        arch=TINY,
        infini={"segment_len": 64},
        batch_size=2,
        segments=[2, 3],
        mix={"lm": 0.5, "passkey": 0.5},
        warmup=0,
        checkpoint_every=100,
        book_names=["alice_in_wonderland_pg11.txt"],
        books=str(books_dir),
    )
    return TrainArgs(**{**base, **kw})


def losses(run):
    return [r["loss"] for r in json.loads((run / "checkpoint" / "trainer.json").read_text())["log"]]


def params(run):
    model, _ = load(run / "checkpoint" / "model")
    return dict(tree_flatten(model.parameters()))


def held_out_loss(model_dir, tokenizer):
    """Cross-entropy of fixed passkey prompts, computed here with plain mlx ops."""
    model, _ = load(model_dir)
    p = Pieces(tokenizer)
    rows = np.stack([passkey_prompt(p, 200, d, k).array() for d, k in [(0.1, 123), (0.7, 4567)]])
    x, y = mx.array(rows[:, :-1]), mx.array(rows[:, 1:])
    return nn.losses.cross_entropy(model(x), y).mean().item()


def test_training_reduces_loss(tmp_path, default_tokenizer, tokenizer_dir, books_dir):
    a = args(tmp_path / "run", tokenizer_dir, books_dir, steps=1, lr=3e-3)
    train(a, log=lambda s: None)
    saved = json.loads((tmp_path / "run" / "checkpoint" / "model" / "config.json").read_text())
    assert saved["infini"]["memory_trained"] is True and saved["infini"]["gate_init"] == 0.0
    before = held_out_loss(tmp_path / "run" / "checkpoint" / "model", default_tokenizer)
    a.steps = 40
    train(a, log=lambda s: None)
    after = held_out_loss(tmp_path / "run" / "checkpoint" / "model", default_tokenizer)
    assert after < 0.7 * before, (before, after)


def test_resume_continues_the_same_run(tmp_path, tokenizer_dir, books_dir):
    train(args(tmp_path / "whole", tokenizer_dir, books_dir, steps=4), log=lambda s: None)
    train(args(tmp_path / "split", tokenizer_dir, books_dir, steps=2), log=lambda s: None)
    train(args(tmp_path / "split", tokenizer_dir, books_dir, steps=4), log=lambda s: None)

    assert len(losses(tmp_path / "split")) == 4
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    a, b = params(tmp_path / "whole"), params(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]), k


def test_gates_and_memory_have_their_own_rates_and_no_decay(tmp_path, tokenizer_dir, default_tokenizer, books_dir):
    lr, gate_lr, memory_lr, wd = 1e-4, 0.05, 3e-3, 0.5
    form = {"segment_len": 64, "memory": "normalized", "conv_size": 4, "write_conv": True}
    a = args(tmp_path / "run", tokenizer_dir, books_dir, steps=1, lr=lr, gate_lr=gate_lr, memory_lr=memory_lr,
             weight_decay=wd, infini=form)
    cfg = InfiniConfig(**form, gate_init=TRAIN_GATE_INIT)  # where train() starts the gates
    first = new_model(TINY, cfg, len(default_tokenizer.vocab), 0)[0]
    start = dict(tree_flatten(first.parameters()))
    train(a, log=lambda s: None)
    end = params(tmp_path / "run")
    # MLX's Adam (no bias correction): a first step moves a weight by
    # lr * (1 - b1) / sqrt(1 - b2) = 3.162 * lr, in the direction of -sign(grad).
    unit = 0.1 / np.sqrt(0.001)
    gates = [k for k in end if k.endswith("self_attn.gate")]
    assert len(gates) == TINY["num_hidden_layers"]
    for k in gates:
        step = np.abs(np.array(end[k] - start[k]))  # tiny gradients (eps) move a little less
        assert step.max() <= unit * gate_lr * 1.001 and step.min() > 0.995 * unit * gate_lr, k
    for k in [k for k in end if k.endswith("q_proj.weight")]:
        w0, w1 = np.array(start[k]), np.array(end[k])
        decayed = w0 * (1 - lr * wd)  # AdamW decays the body before the Adam step
        step = np.abs(w1 - decayed)  # tiny gradients (eps) move less, none more
        assert step.max() <= unit * lr * 1.001 and np.median(step) > 0.99 * unit * lr, k
    # (b_conv1d has no gradient yet: b_proj starts at 0, so its inputs are 0.)
    memory = [k for k in end if any(f".{n}." in k for n in ("k_conv1d", "b_proj", "o_norm"))]
    assert len(memory) == 3 * TINY["num_hidden_layers"]
    for k in memory:  # Adam at memory_lr, no decay
        step = np.abs(np.array(end[k] - start[k]))
        assert step.max() <= unit * memory_lr * 1.001 and np.median(step) > 0.99 * unit * memory_lr, k


def test_conv_lr_moves_only_the_convolution_taps_at_its_rate(tmp_path, tokenizer_dir, default_tokenizer, books_dir):
    memory_lr, conv_lr = 3e-3, 3e-2
    form = {"segment_len": 64, "memory": "normalized", "conv_size": 4}
    a = args(tmp_path / "run", tokenizer_dir, books_dir, steps=1, lr=1e-4, memory_lr=memory_lr, conv_lr=conv_lr,
             infini=form)
    cfg = InfiniConfig(**form, gate_init=TRAIN_GATE_INIT)
    start = dict(tree_flatten(new_model(TINY, cfg, len(default_tokenizer.vocab), 0)[0].parameters()))
    train(a, log=lambda s: None)
    end = params(tmp_path / "run")
    unit = 0.1 / np.sqrt(0.001)  # a first Adam step, as above
    for names, rate in ((("q_conv1d", "k_conv1d", "v_conv1d"), conv_lr), (("b_proj", "o_norm"), memory_lr)):
        keys = [k for k in end if any(f".{n}." in k for n in names)]
        assert len(keys) == len(names) * TINY["num_hidden_layers"]
        for k in keys:
            step = np.abs(np.array(end[k] - start[k]))
            assert step.max() <= unit * rate * 1.001 and np.median(step) > 0.99 * unit * rate, k


def test_subsampled_loss_scores_the_answers_and_equals_the_full_logits(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.train import Batches, weighted_loss

    a = args(tmp_path, tokenizer_dir, books_dir, loss_positions=24, mix={"passkey": 1.0}, segments=[3, 3])
    model = new_model(TINY, InfiniConfig(segment_len=64), len(default_tokenizer.vocab), 0)[0]
    books = np.array(default_tokenizer.encode("Alice was beginning to get very tired. " * 200), np.int32)
    b = Batches(default_tokenizer, books, a, 64)
    x, y, w, idx = b.next(0)
    assert idx.shape == (2, 24) and y.shape == (2, 24)
    assert (np.array(w) == a.answer_weight).sum(axis=1).min() >= 5  # every answer digit is scored
    # Reference: softmax cross-entropy of the full logits, gathered in NumPy.
    logits = np.array(model(x), np.float64)
    i = np.array(idx)
    sel = np.take_along_axis(logits, i[..., None], 1)
    lse = np.log(np.exp(sel - sel.max(-1, keepdims=True)).sum(-1)) + sel.max(-1)
    ce = lse - np.take_along_axis(sel, np.array(y)[..., None], -1)[..., 0]
    ref = (ce * np.array(w)).sum() / np.array(w).sum()
    assert abs(weighted_loss(model, x, y, w, idx).item() - ref) < 1e-4


def test_repeat_targets_are_only_in_an_earlier_segment(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.train import Batches

    a = args(tmp_path, tokenizer_dir, books_dir, mix={"repeat": 1.0})
    b = Batches(default_tokenizer, np.zeros(10, np.int32), a, 64)
    for _ in range(5):
        toks, w, _ = b.repeat(5 * 64 + 1)
        targets = np.flatnonzero(w > 1) + 1
        assert len(targets) >= 10
        text = default_tokenizer.decode(toks.tolist())
        for key in re.findall(r"pass key is (\d+)", text):
            assert text.count(key) == 4  # two mentions, twice
        first = targets[0]
        seg = first // 64
        # The lines before the repeat's segment hold the same digits in the same order,
        # and the repeat's segment holds none of them before the first target.
        before = toks[: seg * 64]
        assert not np.isin(toks[seg * 64 : first], toks[targets]).any()
        digits = default_tokenizer.convert_tokens_to_ids(list("0123456789"))
        assert list(toks[targets]) == list(before[np.isin(before, digits)])


def test_fine_tuning_a_plain_model_opens_its_gates_and_records_the_training(tmp_path, books_dir):
    from tiny import save_base

    save_base(tmp_path / "plain", "llama")  # loaded with gates at -12: the memory weighs nothing
    tok = tmp_path / "plain" / "tokenizer_config.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "bos_token": "t2"}))  # books start with BOS
    a = args(tmp_path / "run", None, books_dir, init=str(tmp_path / "plain"), infini={"segment_len": 8},
             mix={"lm": 1.0}, steps=0)
    train(a, log=lambda s: None)  # a checkpoint without a step: not trained yet
    model, _ = load(tmp_path / "run" / "checkpoint" / "model")
    assert model.infini_config.memory_trained is False
    assert all(mx.all(l.self_attn.gate == TRAIN_GATE_INIT).item() for l in model.layers)
    a.steps = 1
    train(a, log=lambda s: None)
    assert load(tmp_path / "run" / "checkpoint" / "model")[0].infini_config.memory_trained is True



def first_layer_beta(model_dir, tokenizer):
    """Mean write strength of a saved model's first layer over a fixed passkey prompt, by hand."""
    model, _ = load(model_dir)
    x = mx.array(passkey_prompt(Pieces(tokenizer), 200, 0.3, 4242).array()[None])
    layer = model.model.layers[0]
    b = layer.self_attn.b_proj(layer.input_layernorm(model.model.embed_tokens(x)))
    return mx.clip(0.5 + 0.25 * b, 0, 1).mean().item()


def test_write_penalty_lowers_the_write_strengths(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    form = {"segment_len": 64, "memory": "normalized", "conv_size": 4, "write_gate": "clip"}
    for name, penalty in (("free", 0.0), ("penalised", 5.0)):
        a = args(tmp_path / name, tokenizer_dir, books_dir, steps=15, lr=3e-3, infini=form, write_penalty=penalty)
        train(a, log=lambda s: None)
    log = json.loads((tmp_path / "penalised" / "checkpoint" / "trainer.json").read_text())["log"]
    # b_proj starts at zero: every token writes with 0.5 at the first step.
    assert abs(log[0]["beta"] - 0.5) < 1e-6 and log[-1]["beta"] < 0.3, (log[0], log[-1])
    free, penalised = (first_layer_beta(tmp_path / n / "checkpoint" / "model", default_tokenizer)
                       for n in ("free", "penalised"))
    assert penalised < 0.6 * free, (free, penalised)


def test_leaky_write_keeps_the_value_and_leaks_the_gradient_where_the_clip_cuts():
    from infini_mlx.memory import leaky_write, write_strength

    b = mx.array(np.linspace(-6.0, 6.0, 25, dtype=np.float32))  # u = 0.5 + b / 4 crosses 0 and 1
    w = mx.array(np.random.default_rng(0).normal(size=25).astype(np.float32))
    out = leaky_write(write_strength(b, "clip"), b, 0.1)
    u = 0.5 + 0.25 * np.array(b)
    assert np.array_equal(np.array(out), np.clip(u, 0.0, 1.0))
    grad = mx.grad(lambda b: (w * leaky_write(write_strength(b, "clip"), b, 0.1)).sum())(b)
    inside = (u > 0) & (u < 1)
    assert np.allclose(np.array(grad), np.array(w) * np.where(inside, 0.25, 0.025), atol=1e-7)


def test_write_leak_changes_the_write_gradient_only(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.train import logged_cache, mean_write_strength, weighted_loss

    form = InfiniConfig(segment_len=16, memory="normalized", conv_size=4, write_gate="clip", write_conv=True)
    model, _ = new_model(TINY, form, len(default_tokenizer.vocab), seed=0)
    for l in model.layers:  # about half the tokens write nothing
        l.self_attn.b_proj.weight = 8.0 * mx.random.normal(l.self_attn.b_proj.weight.shape, key=mx.random.key(1))
    rows = np.stack([passkey_prompt(Pieces(default_tokenizer), 200, 0.2, k).array()[:64] for k in (123, 4567)])
    x, y, wt = mx.array(rows[:, :-1]), mx.array(rows[:, 1:]), mx.ones((2, 63))

    def grads(leak, penalty_only=False):
        def f(model):
            cache = logged_cache(model)
            for c in cache:
                c.write_leak = leak
            loss = weighted_loss(model, x, y, wt, cache=cache)
            return mean_write_strength(cache) if penalty_only else loss
        loss, g = nn.value_and_grad(model, f)(model)
        return loss.item(), dict(tree_flatten(g))

    (l0, g0), (l1, g1) = grads(0.0), grads(0.1)
    assert l0 == l1  # the forward pass is the same
    for name in ("model.layers.0.self_attn.b_proj.weight", "model.layers.1.self_attn.b_proj.weight"):
        assert not np.allclose(np.array(g0[name]), np.array(g1[name]), rtol=0.05, atol=0)
    # The last layer's other weights get the same gradient (earlier layers' differ: through its input).
    for name in ("q_proj.weight", "v_proj.weight", "gate", "k_conv1d.weight"):
        name = "model.layers.1.self_attn." + name
        assert np.array_equal(np.array(g0[name]), np.array(g1[name]))
    with pytest.raises(ValueError, match="write_leak"):
        train(args(tmp_path, tokenizer_dir, books_dir, steps=1, write_leak=0.1), log=lambda s: None)
    # The write penalty acts on what is written: no leak in its gradient on the last layer's writes.
    p0, p1 = grads(0.0, True)[1], grads(0.1, True)[1]
    name = "model.layers.1.self_attn.b_proj.weight"
    assert np.abs(np.array(p0[name])).max() > 0 and np.array_equal(np.array(p0[name]), np.array(p1[name]))


def test_write_penalty_and_leak_act_on_the_layers_named(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.train import logged_cache, mean_write_strength, step_cache

    form = InfiniConfig(segment_len=16, memory="normalized", conv_size=4, write_gate="clip", write_conv=True)
    model, _ = new_model(TINY, form, len(default_tokenizer.vocab), seed=0)
    for l in model.layers:  # about half the tokens write, differently per layer
        l.self_attn.b_proj.weight = 8.0 * mx.random.normal(l.self_attn.b_proj.weight.shape, key=mx.random.key(1))
    x = mx.array(passkey_prompt(Pieces(default_tokenizer), 200, 0.2, 4321).array()[None, :64])
    every, one = logged_cache(model), logged_cache(model, [1])
    model(x, cache=every)
    model(x, cache=one)
    assert one[0].write_log is None and len(one[1].write_log) == len(every[1].write_log) > 0
    # Layer 1's own strengths, from the log of every layer: the mean of its segments' means.
    want = np.mean([np.array(b).mean() for b in every[1].write_log])
    assert np.isclose(mean_write_strength(one).item(), want, rtol=1e-6)
    assert not np.isclose(mean_write_strength(every).item(), want, rtol=1e-3)

    a = TrainArgs(out=str(tmp_path), write_penalty=1.0, write_penalty_layers=[0], write_leak=0.3, write_leak_layers=[1])
    c = step_cache(model, a)
    assert c[0].write_log == [] and c[1].write_log is None
    assert (c[0].write_leak, c[1].write_leak) == (0.0, 0.3)
    c = step_cache(model, TrainArgs(out=str(tmp_path), write_leak=0.3))
    assert [k.write_leak for k in c] == [0.3, 0.3] and all(k.write_log is None for k in c)
    with pytest.raises(ValueError, match="write_penalty_layers"):
        train(args(tmp_path / "r", tokenizer_dir, books_dir, steps=1, infini={"segment_len": 16, "memory": "normalized"}, write_penalty=1.0,
                   write_penalty_layers=[2]), log=lambda s: None)


def pairwise_overlap(k, b):
    """sum_{i != j} b_i b_j (k_i . k_j)^2 and sum_{i != j} b_i b_j, pair by pair."""
    num = den = 0.0
    for i in range(len(b)):
        for j in range(len(b)):
            if i != j:
                num += b[i] * b[j] * float(k[i] @ k[j]) ** 2
                den += b[i] * b[j]
    return num, den


def test_key_overlap_is_the_write_weighted_mean_squared_cosine_of_written_keys(tmp_path, default_tokenizer):
    from infini_mlx.train import key_overlap, mean_key_overlap, step_cache

    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 3, 9, 4))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    b = rng.random((2, 3, 9)) * (rng.random((2, 3, 9)) < 0.6)
    num, den = key_overlap(mx.array(k, mx.float32), mx.array(b, mx.float32))
    want = np.array([[pairwise_overlap(k[r, h], b[r, h]) for h in range(3)] for r in range(2)])
    assert np.allclose(np.array(num), want[..., 0], rtol=1e-4, atol=1e-6)
    assert np.allclose(np.array(den), want[..., 1], rtol=1e-4, atol=1e-6)

    # In training: layer 1's keys and strengths, logged segment by segment, pooled over the sequence.
    form = InfiniConfig(segment_len=16, memory="normalized", conv_size=4, write_gate="clip")
    model, _ = new_model(TINY, form, len(default_tokenizer.vocab), seed=0)
    for l in model.layers:  # about half the tokens write
        l.self_attn.b_proj.weight = 8.0 * mx.random.normal(l.self_attn.b_proj.weight.shape, key=mx.random.key(1))
    attn, seen = model.layers[1].self_attn, []
    inputs = attn._memory_inputs
    attn._memory_inputs = lambda *a: seen.append(inputs(*a)) or seen[-1]
    c = step_cache(model, TrainArgs(out=str(tmp_path), key_overlap=1.0, write_penalty=1.0, write_penalty_layers=[1]))
    assert c[0].key_log is None and c[1].key_log == []
    x = mx.array(passkey_prompt(Pieces(default_tokenizer), 200, 0.2, 4321).array()[None, :64])
    for i in range(0, 64, 16):  # a segment per call: the log pools them
        model(x[:, i : i + 16], cache=c)
    K = np.concatenate([np.array(s[1]) for s in seen], axis=2)[0]
    B = np.concatenate([np.array(s[3]) for s in seen], axis=2)[0]
    assert len(seen) == 4 and (B > 0).mean() > 0.2
    pairs = np.array([pairwise_overlap(K[h], B[h]) for h in range(K.shape[0])])
    assert np.isclose(mean_key_overlap(c).item(), pairs[:, 0].sum() / pairs[:, 1].sum(), rtol=1e-4)

    # The strengths only weigh the pairs: the penalty moves keys, not what is written.
    attn._memory_inputs = inputs

    def penalty(model):
        c = step_cache(model, TrainArgs(out=str(tmp_path), key_overlap=1.0, write_penalty=1.0, write_penalty_layers=[1]))
        model(x, cache=c)
        return mean_key_overlap(c)

    _, g = nn.value_and_grad(model, penalty)(model)
    g = g["model"]["layers"][1]["self_attn"]
    assert mx.abs(g["b_proj"]["weight"]).max().item() == 0.0
    assert mx.abs(g["k_proj"]["weight"]).max().item() > 0.0


def test_key_overlap_needs_the_normalised_memory(tmp_path, tokenizer_dir, books_dir):
    with pytest.raises(ValueError, match="key_overlap needs the normalised memory"):
        train(args(tmp_path / "r", tokenizer_dir, books_dir, steps=1, key_overlap=1.0), log=lambda s: None)
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_key_digits_draw_each_key_length_as_documented(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.train import Batches

    lengths = {}
    for mode in ("paper", "uniform", "mixed"):
        a = args(tmp_path, tokenizer_dir, books_dir, key_digits=mode)
        b = Batches(default_tokenizer, np.zeros(10, np.int32), a, 64)
        keys = [b.key() for _ in range(5000)]
        assert 1 <= min(keys) and max(keys) <= 50000
        lengths[mode] = np.bincount([len(str(k)) for k in keys], minlength=6)[1:] / len(keys)
    # randint(1, 50000): 9, 90, 900, 9,000 and 40,001 keys of 1 to 5 digits
    paper = np.array([9, 90, 900, 9000, 40001]) / 50000
    assert np.all(np.abs(lengths["paper"] - paper) < 0.02)
    assert np.all(np.abs(lengths["uniform"] - 0.2) < 0.03)
    assert np.all(np.abs(lengths["mixed"] - (paper + 0.2) / 2) < 0.03)
    # The prompt itself carries the drawn key.
    text = default_tokenizer.decode(b.passkey(3 * 64 + 1)[0].tolist())
    assert re.search(r"pass key is \d{1,5}\.", text)
    with pytest.raises(ValueError, match="key_digits"):
        Batches(default_tokenizer, np.zeros(10, np.int32), args(tmp_path, tokenizer_dir, books_dir, key_digits="x"), 64)


def test_shared_needle_values_differ_only_after_a_common_prefix(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)

    def fact_values(shared):
        b = Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, needle_shared=shared), 64)
        for _ in range(30):
            text = default_tokenizer.decode(b.needle(8 * 64 + 1)[0].tolist())
            yield [v for _, v in re.findall(r"special code for (\w+) is (\d+)\.", text)]

    for vals in fact_values(1.0):
        assert len(vals) == 2 * 4 and len(set(vals)) == 4  # four facts, each asked once
        assert len({len(v) for v in vals}) == 1 and len({v[0] for v in vals}) == 1, vals
    # Drawn independently, four values rarely share their first digit and length.
    same = [len({(len(v), v[0]) for v in vals}) == 1 for vals in fact_values(0.0)]
    assert sum(same) < 5



def test_needle_facts_sets_how_many_facts_a_long_needle_row_holds(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    for n, T, want in ((8, 16 * 64 + 1, 8), (8, 4 * 64 + 1, (4 * 64 + 1 - 40) // 45), (2, 16 * 64 + 1, 2)):
        b = Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, needle_facts=n), 64)
        text = default_tokenizer.decode(b.needle(T)[0].tolist())
        facts = re.findall(r"special code for (\w+) is (\d+)\.", text)
        assert len(facts) == 2 * want and len({name for name, _ in facts}) == want, (n, T, facts)


def test_qa_sentence_puts_the_key_line_after_a_sentence(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    before = {}
    for on in (False, True):
        b = Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, qa_sentence=on), 64)
        ends = 0
        for _ in range(40):
            text = default_tokenizer.decode(b.qa(8 * 64 + 1)[0].tolist())
            head = text[: text.index("The pass key is")].rstrip()
            ends += head[-1:] in (".", "!", "?")
        before[on] = ends
    assert before[True] >= 38 and before[False] <= 20, before


def test_qa_distractors_add_numbers_that_are_not_the_key(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    T = 8 * 64 + 1
    plain = Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir), 64).qa(T)
    b = Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, qa_distractors=3), 64)
    for _ in range(10):
        toks, w, n = b.qa(T)
        assert len(toks) == T and len(w) == T - 1
        text = default_tokenizer.decode(toks.tolist())
        key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text).group(1)
        others = re.findall(r"special code for \w+ is \d+\.|Chapter \d+\n", text)
        assert len(others) == 3, text
        assert text.endswith(f"Answer: {key}.") and w[-n + 1 :].min() > 1
    # Without them, the book text around the key line is one unbroken window of the books.
    toks, text = plain[0], default_tokenizer.decode(plain[0].tolist())
    key = int(re.search(r"The pass key is (\d+)\.", text).group(1))
    p = Pieces(default_tokenizer)
    info, tail = p.word(info_line(key)), len(p.enc("\n\n" + plain_question("What is the pass key?"))) + plain[2]
    a = next(j for j in range(len(toks)) if list(toks[j : j + len(info)]) == info)
    hay = np.concatenate([toks[:a], toks[a + len(info) : len(toks) - tail]])
    starts = np.flatnonzero(books[: len(books) - len(hay)] == hay[0])
    assert any(np.array_equal(books[s : s + len(hay)], hay) for s in starts)


def test_needle_values_do_not_depend_on_the_hash_seed():
    import os
    import subprocess
    import sys

    # A run's data must follow from its --seed alone (set iteration order follows PYTHONHASHSEED).
    code = (
        "import numpy as np\n"
        "from infini_mlx.train import Batches, TrainArgs\n"
        "b = Batches.__new__(Batches)\n"
        "b.rng, b.args = np.random.default_rng(0), TrainArgs(out='x', needle_shared=1.0)\n"
        "print([b.needle_values(4) for _ in range(50)])\n"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                       capture_output=True, text=True, check=True).stdout
        for h in ("1", "2")
    }
    assert len(outs) == 1, outs


def test_probes_draw_the_evaluations_keys_whatever_the_training_draws(
    tmp_path, tokenizer_dir, books_dir, default_tokenizer, monkeypatch
):
    import infini_mlx.passkey as pk
    from infini_mlx.train import Batches, probe_retrieval

    seen = []
    monkeypatch.setattr(pk, "teacher_forced_match", lambda m, rows, n: seen.append(rows) or [True] * len(rows))
    books = np.arange(20000, dtype=np.int32) % 3000 + 10
    for kw in ({}, {"needle_shared": 1.0, "key_digits": "uniform"}):
        a = args(tmp_path, tokenizer_dir, books_dir, mix={"passkey": 0.5, "needle": 0.5}, **kw)
        b = Batches(default_tokenizer, books, a, 64)
        probe_retrieval(None, b, [8], trials=4)
        assert b.args is a
    plain, trained = seen[:2], seen[2:]
    assert all(np.array_equal(x, y) for p, q in zip(plain, trained) for x, y in zip(p, q))


@pytest.mark.parametrize("chain", [False, True])
def test_carried_rows_ask_the_facts_their_memory_holds(tmp_path, tokenizer_dir, books_dir, default_tokenizer, monkeypatch, chain):
    import infini_mlx.train as tr
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    monkeypatch.setattr(tr, "NEEDLE_NAMES", tr.NEEDLE_NAMES[:6])  # names often drawn again

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    a = args(tmp_path, tokenizer_dir, books_dir, batch_size=6, segments=[3, 3], carry_state=1.0, carry_ask=1.0,
             carry_ask_chain=chain, mix={"needle": 0.5, "lm": 0.5})
    b = Batches(default_tokenizer, books, a, 64)
    fact = re.compile(r"(?:^|\n)The special code for (\w+) is (\d+)\.")  # fact lines, not answers
    asked = re.compile(r"What is the special code for (\w+)\? The special code for \1 is (\d+)\.$")
    held, last, n_asked, n_older = [None] * 6, [None] * 6, 0, 0
    for step in range(6):
        carried = step % 3 != 0  # every third batch starts from an empty memory
        x, y, w, _ = b.next(step, carried=carried)
        rows = np.concatenate([np.array(x), np.array(y)[:, -1:]], 1)
        assert rows.shape[1] == 3 * 64 + 1
        for r in range(6):
            text = default_tokenizer.decode(rows[r].tolist())
            q = asked.search(text)
            if not carried or held[r] is None:
                assert q is None or q.group(1) in dict(fact.findall(text)), text[-200:]
            own = dict(fact.findall(text))
            if q and q.group(1) in own:
                assert own[q.group(1)] == q.group(2)  # the row's own fact (a name not asked from before)
            if q and q.group(1) not in own:
                # A question on an earlier batch's fact: the value that row's last needle wrote
                # (with chain: the newest value of that name since the memory was empty).
                assert held[r][q.group(1)] == q.group(2)
                n_older += q.group(1) not in last[r]
                n_ans = len(default_tokenizer.encode(" " + q.group(2) + ".", add_special_tokens=False))
                assert np.all(np.array(w)[r, -n_ans:] == a.answer_weight)
                n_asked += 1
            facts = dict(fact.findall(text))
            if not carried:
                held[r] = last[r] = None
            if facts:
                held[r] = {**(held[r] or {}), **facts} if chain else facts
                last[r] = facts
    assert n_asked >= 4
    assert (n_older > 0) == chain  # only a chain asks facts older than the last needle
    with pytest.raises(ValueError, match="carry_state"):
        Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, carry_ask=0.5), 64)


def test_carry_ask_key_asks_the_newest_key_the_memory_holds(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    a = args(tmp_path, tokenizer_dir, books_dir, batch_size=6, segments=[4, 4], carry_state=1.0, carry_ask=1.0,
             carry_ask_key=0.7, mix={"qa": 0.3, "passkey": 0.2, "needle": 0.2, "lm": 0.3}, seed=5)
    b = Batches(default_tokenizer, books, a, 64)
    written = re.compile(r"The pass key is (\d+)\. Remember it\.")  # key lines, not answers
    asked = re.compile(r"\n\nQuestion: What is the pass key\?\nAnswer: (\d+)\.$")
    key, n_asked, n_needle = [None] * 6, 0, 0
    for step in range(12):
        carried = step % 4 != 0
        x, y, w, _ = b.next(step, carried=carried)
        rows = np.concatenate([np.array(x), np.array(y)[:, -1:]], 1)
        for r in range(6):
            text = default_tokenizer.decode(rows[r].tolist())
            own = written.findall(text)
            q = asked.search(text)
            if q and not own:  # a carried question: the newest key of an earlier batch, weighed as an answer
                assert carried and key[r] == q.group(1), (key[r], text[-120:])
                n_ans = len(default_tokenizer.encode(" " + q.group(1) + ".", add_special_tokens=False))
                assert np.all(np.array(w)[r, -n_ans:] == a.answer_weight)
                n_asked += 1
            n_needle += bool(re.search(r"What is the special code for \w+\? The special code for \w+ is \d+\.$", text))
            if not carried:
                key[r] = None
            if own:
                key[r] = own[-1]
    assert n_asked >= 8 and n_needle >= 2
    with pytest.raises(ValueError, match="carry_ask"):
        Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, carry_state=1.0, carry_ask_key=0.5), 64)



@pytest.mark.parametrize("carry", [False, True])
def test_answer_shift_puts_book_text_after_the_last_answer(tmp_path, tokenizer_dir, books_dir, default_tokenizer, carry):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    kw = dict(carry_state=1.0, carry_ask=1.0) if carry else {}
    ends = {}
    for shift in (0.0, 1.0):
        a = args(tmp_path, tokenizer_dir, books_dir, batch_size=4, segments=[3, 3], answer_shift=shift,
                 mix={"qa": 0.5, "passkey": 0.5}, seed=2, **kw)
        b = Batches(default_tokenizer, books, a, 64)
        ends[shift] = []
        for step in range(6):
            x, y, w, _ = b.next(step, carried=carry and step > 0)
            rows = np.concatenate([np.array(x), np.array(y)[:, -1:]], 1)
            assert rows.shape[1] == 3 * 64 + 1
            for r in range(4):
                last = int(np.flatnonzero(np.array(w)[r] > 1)[-1]) + 1  # the last answer token's position
                ends[shift].append(rows.shape[1] - 1 - last)  # tokens after it
                if shift:  # what follows is a window of the books, as is
                    tail = rows[r, last + 1 :]
                    starts = np.flatnonzero(books[: len(books) - len(tail)] == tail[0])
                    assert any(np.array_equal(books[i : i + len(tail)], tail) for i in starts)
    assert set(ends[0.0]) == {0}  # answers end the row: the segment's end
    assert min(ends[1.0]) >= 1 and max(ends[1.0]) <= 63 and len(set(ends[1.0])) > 10
    # The shortest rows (2 segments) with a carried question keep room for a passkey prompt.
    a = args(tmp_path, tokenizer_dir, books_dir, batch_size=8, segments=[2, 2], answer_shift=1.0,
             mix={"passkey": 0.5, "needle": 0.5}, seed=3, carry_state=1.0, carry_ask=1.0)
    b = Batches(default_tokenizer, books, a, 64)
    for step in range(10):
        assert np.array(b.next(step, carried=step > 0)[0]).shape == (8, 2 * 64)

def test_chain_new_names_never_write_a_held_name_again(tmp_path, tokenizer_dir, books_dir, default_tokenizer, monkeypatch):
    import infini_mlx.train as tr
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    monkeypatch.setattr(tr, "NEEDLE_NAMES", tr.NEEDLE_NAMES[:12])  # three needles' worth
    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    fact = re.compile(r"(?:^|\n)The special code for (\w+) is (\d+)\.")
    counts = {}
    for new in (False, True):
        a = args(tmp_path, tokenizer_dir, books_dir, batch_size=6, segments=[4, 4], carry_state=1.0, carry_ask=1.0,
                 carry_ask_chain=True, chain_new_names=new, mix={"needle": 1.0}, seed=3)
        b = Batches(default_tokenizer, books, a, 64)
        held, again, fresh = [set() for _ in range(6)], 0, 0
        for step in range(8):
            carried = step % 4 != 0
            x, y, _, _ = b.next(step, carried=carried)
            rows = np.concatenate([np.array(x), np.array(y)[:, -1:]], 1)
            for r in range(6):
                names = [n for n, _ in fact.findall(default_tokenizer.decode(rows[r].tolist()))]
                if not carried:
                    held[r] = set()
                if len(held[r]) <= 12 - len(names):  # enough names left to avoid every held one
                    again += len(set(names) & held[r])
                    fresh += 1
                held[r] |= set(names)
        counts[new] = again, fresh
    assert counts[False][0] > 0 and counts[True][0] == 0 and counts[True][1] >= 12
    with pytest.raises(ValueError, match="carry_ask_chain"):
        Batches(default_tokenizer, books, args(tmp_path, tokenizer_dir, books_dir, carry_state=1.0, carry_ask=1.0,
                                               chain_new_names=True), 64)


def test_a_run_with_carried_questions_trains(tmp_path, tokenizer_dir, books_dir):
    lines = []
    a = args(tmp_path, tokenizer_dir, books_dir, steps=6, carry_state=1.0, carry_ask=1.0,
             mix={"needle": 0.5, "lm": 0.5}, infini={"segment_len": 64, "memory": "normalized"}, write_penalty=0.1)
    train(a, log=lines.append)
    log = [json.loads(s) for s in lines[1:]]
    assert len(log) == 6 and all(np.isfinite(r["loss"]) for r in log)


def test_first_fact_weight_weighs_the_answer_of_the_fact_written_first(tmp_path, tokenizer_dir, books_dir, default_tokenizer):
    from infini_mlx.data import book_tokens
    from infini_mlx.train import Batches

    books = np.array(book_tokens(default_tokenizer, books_dir, ["alice_in_wonderland_pg11.txt"]), np.int32)
    fact = re.compile(r"(?:^|\n)The special code for (\w+) is (\d+)\.")
    rows = {}
    for W in (1.0, 3.0):
        a = args(tmp_path, tokenizer_dir, books_dir, batch_size=4, segments=[4, 4], mix={"needle": 1.0},
                 first_fact_weight=W, seed=5)
        rows[W] = Batches(default_tokenizer, books, a, 64).next(0)
    x1, y1, w1, _ = rows[1.0]
    x3, y3, w3, _ = rows[3.0]
    assert np.array_equal(np.array(x1), np.array(x3))  # the same data: only the weights change
    for r in range(4):
        toks = np.array(x1)[r].tolist() + [int(np.array(y1)[r, -1])]
        first = fact.findall(default_tokenizer.decode(toks))[0][1]  # the value written first
        # Each answer is " VALUE." after "... is"; find the first value's answer tokens independently.
        ans = default_tokenizer.encode(" " + first + ".", add_special_tokens=False)
        ratio = np.array(w3)[r] / np.array(w1)[r]
        tripled = np.flatnonzero(ratio == 3.0)
        assert len(tripled) == len(ans)
        assert [toks[i + 1] for i in tripled] == ans  # targets of the tripled weights spell the answer
        assert np.all(ratio[np.setdiff1d(np.arange(len(ratio)), tripled)] == 1.0)
