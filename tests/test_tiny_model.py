"""The symbolic tasks (m2kt.toy.symbolic) and the tiny transformer (m2kt.toy.model, .train, .checkpoint)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")

from m2kt.nn.digest import state_dict_sha256  # noqa: E402
from m2kt.toy.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_tiny, save_tiny  # noqa: E402
from m2kt.toy.model import TinyConfig, TinyTransformer  # noqa: E402
from m2kt.toy.symbolic import EQUALS, OPERATIONS, PAD, ModularTask, UnknownTokenError, Vocabulary, parse_expression  # noqa: E402
from m2kt.toy.train import TrainConfig, accuracy, answer_logits, encode_batch, train_tiny  # noqa: E402

ADD_SUB = ModularTask(p=23, operators={"add": "add", "sub": "sub"})


def fresh_model(task: ModularTask = ADD_SUB, seed: int = 0, **shape: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(TinyConfig(vocab=task.vocabulary(), **shape)).eval()


# ---------------------------------------------------------------------------------------------- symbolic tasks


def test_vocabulary_is_deterministic_and_holds_aliases_and_operators() -> None:
    task = ModularTask(
        p=5,
        operators={"sub": "sub", "plus": "add", "add": "add"},
        number_aliases={"three'": 3, "one'": 1},
        vocab_operators=("mul",),
    )
    expected = [PAD, "0", "1", "2", "3", "4", "one'", "three'", "add", "mul", "plus", "sub", EQUALS]
    assert task.vocabulary() == expected
    reordered = ModularTask(
        p=5,
        operators={"add": "add", "plus": "add", "sub": "sub"},
        number_aliases={"one'": 1, "three'": 3},
        vocab_operators=("mul",),
    )
    assert reordered.vocabulary() == expected and reordered == task and hash(reordered) == hash(task)

    vocab = Vocabulary(task.vocabulary())
    assert len(vocab) == len(expected) and vocab.pad_id == 0 and vocab.tokens == expected
    assert "three'" in vocab and "mul" in vocab and "frob" not in vocab
    ids = vocab.encode(parse_expression("three' plus 4 ="))
    assert ids == [vocab.id("three'"), vocab.id("plus"), vocab.id("4"), vocab.id(EQUALS)]
    assert vocab.decode(ids) == ["three'", "plus", "4", "="]


def test_unknown_token_is_named() -> None:
    vocab = Vocabulary(ADD_SUB.vocabulary())
    with pytest.raises(UnknownTokenError, match="frobnicate") as info:
        vocab.encode(["3", "frobnicate", "5", "="])
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert info.value.token == "frobnicate"
    with pytest.raises(ValueError, match="23"):
        vocab.encode(["23"])  # numbers stop at p - 1
    with pytest.raises(UnknownTokenError):
        vocab.decode([len(vocab)])
    with pytest.raises(ValueError, match="token 0"):
        Vocabulary(["a", PAD])
    with pytest.raises(ValueError, match="unique"):
        Vocabulary([PAD, "a", "a"])


def test_examples_count_and_answers() -> None:
    task = ModularTask(p=7, operators={"add": "add", "plus": "add", "sub": "sub", "add2b": "add2b"})
    examples = task.examples()
    assert len(examples) == 7 * 7 * 4
    assert len({ex.tokens for ex in examples}) == len(examples)
    for ex in examples:
        a, op, b, eq = ex.tokens
        assert eq == EQUALS and op == ex.operator and task.operators[op] == ex.operation
        expected = {"add": (int(a) + int(b)) % 7, "sub": (int(a) - int(b)) % 7, "add2b": (int(a) + 2 * int(b)) % 7}
        assert ex.answer == str(expected[ex.operation])
    assert task.answer(3, "sub", 5) == 5 and task.answer(3, "add2b", 5) == 6 and task.answer(3, "plus", 5) == 1
    assert task.examples() == examples  # deterministic order

    only_plus = task.examples(["plus"])
    assert len(only_plus) == 49 and {ex.operator for ex in only_plus} == {"plus"}
    with pytest.raises(ValueError, match="mul"):
        task.examples(["mul"])

    aliased = ModularTask(p=5, number_aliases={"three'": 3})
    with_aliases = aliased.examples(use_aliases=True)
    assert len(aliased.examples()) == 5 * 5 * 2 and len(with_aliases) == 6 * 6 * 2
    alias_example = next(ex for ex in with_aliases if ex.tokens == ("three'", "add", "4", "="))
    assert alias_example.answer == "2"
    assert OPERATIONS["max"](3, 5, 7) == 5 and OPERATIONS["min"](3, 5, 7) == 3 and OPERATIONS["mul"](3, 5, 7) == 1


def test_split_is_deterministic_and_disjoint() -> None:
    examples = ADD_SUB.examples()
    assert len(examples) == 1058
    train, test = ADD_SUB.split(examples, test_fraction=0.2, seed=0)
    again = ADD_SUB.split(examples, test_fraction=0.2, seed=0)
    assert (train, test) == again
    assert len(test) == 212 and len(train) == 846
    assert not set(train) & set(test) and set(train) | set(test) == set(examples)
    assert ADD_SUB.split(examples, test_fraction=0.2, seed=1)[1] != test
    with pytest.raises(ValueError):
        ADD_SUB.split(examples, test_fraction=1.0, seed=0)


def test_task_json_round_trip_and_validation() -> None:
    task = ModularTask(
        p=11, operators={"plus": "add", "times": "mul"}, number_aliases={"two'": 2}, vocab_operators=("x",)
    )
    data = json.loads(json.dumps(task.to_json()))
    assert ModularTask.from_json(data) == task and ModularTask.from_json(data).to_json() == task.to_json()
    assert ModularTask() == ModularTask.from_json(ModularTask().to_json())
    with pytest.raises(ValueError, match="unknown operation"):
        ModularTask(operators={"pow": "pow"})
    with pytest.raises(ValueError, match="p must be"):
        ModularTask(p=1)
    with pytest.raises(ValueError, match="collides"):
        ModularTask(operators={"3": "add"})
    with pytest.raises(ValueError, match="alias"):
        ModularTask(p=5, number_aliases={"big": 5})
    with pytest.raises(TypeError):
        task.operators["minus"] = "sub"  # type: ignore[index]
    assert parse_expression("  3 add\t5 = ") == ("3", "add", "5", "=")


# ---------------------------------------------------------------------------------------------- the model


def test_padded_keys_get_zero_attention_and_no_nan() -> None:
    model = fresh_model()
    vocab = Vocabulary(ADD_SUB.vocabulary())
    sequences = [("3", "add", "5", "="), ("7", "="), ("4",)]
    ids, mask = encode_batch(vocab, sequences, "cpu")
    assert ids.shape == (3, 4) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[2, 1:].tolist() == [vocab.pad_id] * 3 and mask.sum(dim=1).tolist() == [4, 2, 1]

    seen: list[torch.Tensor] = []
    handle = model.blocks[0].attn.probs.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        logits = model(ids, mask)
    finally:
        handle.remove()
    assert logits.shape == (3, 4, len(vocab)) and torch.isfinite(logits).all()
    (probs,) = seen
    assert probs.shape == (3, model.config.n_heads, 4, 4)
    assert torch.isfinite(probs).all()
    keys_padded = ~mask[:, None, None, :].expand_as(probs)
    assert (probs[keys_padded] == 0).all()
    assert (probs.triu(diagonal=1) == 0).all()  # causal
    real_rows = mask[:, None, :, None].expand(-1, probs.shape[1], -1, 1).squeeze(-1)
    assert torch.allclose(probs.sum(-1)[real_rows], torch.ones(()))

    # Padding does not change what real positions compute.
    alone = model(*encode_batch(vocab, [("7", "=")], "cpu"))
    assert torch.allclose(alone[0], logits[1, :2], atol=1e-5)
    last = answer_logits(model, ids, mask)
    assert torch.equal(last, logits[torch.arange(3), torch.tensor([3, 1, 0])])

    # A row that is all padding (no real token at all) still gives finite numbers.
    empty = torch.zeros_like(mask)
    empty[0] = True
    assert torch.isfinite(model(ids, empty)).all()


def test_hooks_see_residual_stream_shapes() -> None:
    model = fresh_model(n_layers=3, d_model=48, n_heads=3)
    vocab = Vocabulary(ADD_SUB.vocabulary())
    ids, mask = encode_batch(vocab, [("1", "sub", "2", "="), ("5", "=")], "cpu")
    outputs: dict[str, torch.Tensor] = {}
    names = ["embed"] + [f"blocks.{i}" for i in range(3)]
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name in names
    ]
    try:
        model(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {name: (2, 4, 48) for name in names}
    positions = torch.arange(4)
    assert torch.allclose(outputs["embed"], model.embed.tok(ids) + model.embed.pos(positions))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, model.config.max_len + 1, dtype=torch.long))


def test_config_validation_and_json() -> None:
    config = TinyConfig(vocab=ADD_SUB.vocabulary(), d_model=48, n_heads=3, n_layers=3)
    assert TinyConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ValueError, match="divisible"):
        TinyConfig(vocab=ADD_SUB.vocabulary(), d_model=64, n_heads=3)
    with pytest.raises(ValueError, match="vocab"):
        TinyConfig(vocab=["0", PAD])
    with pytest.raises(ValueError, match="unique"):
        TinyConfig(vocab=[PAD, "a", "a"])
    with pytest.raises(ValueError, match="n_layers"):
        TinyConfig(vocab=ADD_SUB.vocabulary(), n_layers=0)
    with pytest.raises(ValueError, match="unknown"):
        TinyConfig.from_json({**config.to_json(), "bogus": 1})
    with pytest.raises(ValueError):
        TrainConfig(steps=0)


def test_training_reaches_held_out_accuracy() -> None:
    model, metrics = train_tiny(ADD_SUB, TinyConfig(vocab=ADD_SUB.vocabulary()), TrainConfig())
    assert metrics["test_accuracy"] >= 0.99, metrics
    assert metrics["train_accuracy"] >= 0.99, metrics
    assert metrics["device"] == "cpu" and metrics["steps"] == TrainConfig().steps and metrics["seconds"] > 0
    assert not model.training
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # model config restored
    _, test = ADD_SUB.split(ADD_SUB.examples(), test_fraction=0.2, seed=0)
    vocab = Vocabulary(ADD_SUB.vocabulary())
    assert accuracy(model, test, vocab, device="cpu", batch_size=50) == metrics["test_accuracy"]


def test_same_seed_trains_bit_identical_weights() -> None:
    config = TinyConfig(vocab=ADD_SUB.vocabulary())
    short = TrainConfig(steps=50)
    first, m1 = train_tiny(ADD_SUB, config, short)
    second, m2 = train_tiny(ADD_SUB, config, short)
    assert state_dict_sha256(first) == state_dict_sha256(second)
    s1, s2 = first.state_dict(), second.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m1["train_accuracy"] == m2["train_accuracy"] and m1["steps"] == 50
    minibatch, _ = train_tiny(ADD_SUB, config, TrainConfig(steps=5, batch_size=64, seed=1))
    assert state_dict_sha256(minibatch) != state_dict_sha256(first)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = fresh_model(seed=3)
    out = save_tiny(model, tmp_path / "ckpt")
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    text = (out / CONFIG_FILE).read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))
    stored = safetensors.numpy.load_file(out / WEIGHTS_FILE)  # plain safetensors, no pickle
    assert set(stored) == set(model.state_dict())

    loaded = load_tiny(out)
    assert loaded.config == model.config and not loaded.training
    vocab = Vocabulary(model.config.vocab)
    ids, mask = encode_batch(vocab, [("3", "add", "5", "="), ("1", "=")], "cpu")
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    assert state_dict_sha256(loaded) == state_dict_sha256(model)

    # The digest is sha256 over (name bytes, raw little-endian bytes) in sorted name order.
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tobytes())
    assert state_dict_sha256(model) == digest.hexdigest()
    with torch.no_grad():
        loaded.head.weight[0, 0] += 1.0
    assert state_dict_sha256(loaded) != state_dict_sha256(model)


def test_load_refuses_mismatched_or_missing_files(tmp_path: Path) -> None:
    out = save_tiny(fresh_model(), tmp_path / "ckpt")
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, "d_ff": 128}))
    with pytest.raises(ValueError, match="shape"):
        load_tiny(out)
    (out / CONFIG_FILE).write_text(json.dumps({**config, "n_layers": 1}))
    with pytest.raises(ValueError, match="unexpected"):
        load_tiny(out)
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="invalid config"):
        load_tiny(out)
    with pytest.raises(ValueError, match="missing"):
        load_tiny(tmp_path / "nowhere")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path: Path) -> None:
    model = fresh_model()
    vocab = Vocabulary(ADD_SUB.vocabulary())
    ids, mask = encode_batch(vocab, [("3", "add", "5", "="), ("1", "=")], "cpu")
    gpu = load_tiny(save_tiny(model, tmp_path / "ckpt"), device="cuda")
    with torch.no_grad():
        got = gpu(*encode_batch(vocab, [("3", "add", "5", "="), ("1", "=")], "cuda")).cpu()
        assert torch.allclose(got, model(ids, mask), atol=1e-4)
    assert state_dict_sha256(gpu) == state_dict_sha256(model)
    trained, metrics = train_tiny(ADD_SUB, model.config, TrainConfig(steps=20, device="cuda"))
    assert metrics["device"] == "cuda" and next(trained.parameters()).is_cuda
