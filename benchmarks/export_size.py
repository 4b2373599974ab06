"""Size of an exported recommender bundle against the size of its backbone (ML-100K, SmolLM2-135M by default).

Builds the ML-100K dataset bundle on the fixed ml-100k-random split (or uses ``--data``), builds a fresh
CLLM4Rec on it with the default ModelConfig (LoRA r=16 on peft's default modules, both views, tied head) and
exports it once per ``--dtypes`` entry; sizes do not depend on training, so no training is done. With
``--merge`` one more export adds the merged plain-transformers model. Prints a table and writes JSON.

    python benchmarks/export_size.py [--spec smollm2-135m] [--dtypes fp32,fp16,bf16] [--merge] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common.log import setup_logging
from data_prep import load_bundle
from data_prep.build import BuildConfig, build
from llmrec.backbone import BackboneConfig
from llmrec.bundle import ADAPTER_DIR, MERGED_DIR, WEIGHTS_FILE
from llmrec.export import export_model
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.reporting import machine_info, write_report

SHARED = Path(__file__).resolve().parents[2] / "shared"


def size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def parts(bundle: Path) -> dict[str, int]:
    """Bytes per part: ID tables + head, LoRA adapter, merged model, everything else (ids, histories, config)."""
    out = {"tables+head": size(bundle / WEIGHTS_FILE), "adapter": size(bundle / ADAPTER_DIR)}
    out["merged"] = size(bundle / MERGED_DIR) if (bundle / MERGED_DIR).exists() else 0
    out["ids+histories+config"] = size(bundle) - sum(out.values())
    out["total"] = size(bundle)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smollm2-135m", help="backbone spec")
    parser.add_argument("--data", default=None, help="dataset bundle (default: build ML-100K from ../shared)")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated export dtypes")
    parser.add_argument("--merge", action="store_true", help="also export with --merge (fp32)")
    parser.add_argument("--seed", type=int, default=0, help="ID-table init seed")
    parser.add_argument("--out", default="benchmarks/results/export_size.json")
    args = parser.parse_args()
    setup_logging("WARNING")

    with tempfile.TemporaryDirectory(prefix="llmrec-export-size-") as tmp:
        tmp = Path(tmp)
        data = args.data or build(
            BuildConfig(
                format="recbole",
                input=str(SHARED / "datasets" / "ml-100k"),
                split="presplit",
                presplit=str(SHARED / "benchmarks" / "ml-100k-random"),
                out=str(tmp / "ml-100k"),
            )
        )
        dataset = load_bundle(data)
        model_config, backbone = ModelConfig(), BackboneConfig(args.spec)
        model = CLLM4Rec.from_config(
            model_config, backbone, dataset.n_users, dataset.n_items, dataset.item_titles, seed=args.seed
        )
        lm = model.lm.get_base_model()
        backbone_params = sum(p.numel() for p in lm.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        backbone_bytes = {
            "fp32": backbone_params * 4,
            "fp16": backbone_params * 2,
            "checkpoint files": size(Path(lm.config.name_or_path))
            if Path(lm.config.name_or_path).is_dir()
            else 0,
        }
        runs = [(dtype, False) for dtype in args.dtypes.split(",")] + ([("fp32", True)] if args.merge else [])
        rows: dict[str, dict[str, float]] = {}
        for dtype, merge in runs:  # the merged export folds LoRA into the model, so it comes last
            name = f"{dtype}{' --merge' if merge else ''}"
            start = time.perf_counter()
            bundle = export_model(model, dataset, tmp / name.replace(" ", ""), dtype=dtype, merge=merge)
            seconds = time.perf_counter() - start
            rows[name] = {**parts(bundle), "seconds": seconds}
            rows[name]["share_of_fp32_backbone"] = (
                rows[name]["total"] - rows[name]["merged"]
            ) / backbone_bytes["fp32"]

    print(
        f"{args.spec}: {backbone_params / 1e6:.1f}M parameters = {backbone_bytes['fp32'] / 1e6:.1f} MB fp32 "
        f"({backbone_bytes['fp16'] / 1e6:.1f} MB fp16); ML-100K: {dataset.n_users} users, {dataset.n_items} items"
    )
    columns = ["tables+head", "adapter", "ids+histories+config", "merged", "total"]
    print(
        f"{'export':<14}" + "".join(f"{c + ' MB':>24}" for c in columns) + f"{'bundle/backbone':>17}{'s':>7}"
    )
    for name, row in rows.items():
        cells = "".join(f"{row[c] / 1e6:>24.2f}" for c in columns)
        print(f"{name:<14}{cells}{row['share_of_fp32_backbone']:>16.1%}{row['seconds']:>7.1f}")
    result = {
        "spec": args.spec,
        "backbone_parameters": backbone_params,
        "backbone_bytes": backbone_bytes,
        "dataset": {"path": str(data), "users": dataset.n_users, "items": dataset.n_items},
        "model_config": asdict(model_config),
        "trainable_parameters": trainable,
        "exports": rows,
        "note": "bundle/backbone = bundle without merged/ over the backbone's fp32 parameter bytes",
        "seed": args.seed,
        "machine": machine_info(),
    }
    write_report(args.out, result)


if __name__ == "__main__":
    main()
