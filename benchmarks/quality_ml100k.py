"""Quality on the fixed ML-100K split: the LLM recommender from a config beside Pop, EASE and Mult-VAE.

    python benchmarks/quality_ml100k.py [--config recipes/configs/ml-100k-cpu.yaml] [--out FILE.json]

Builds the bundle from ../shared if needed, runs pretrain -> finetune -> evaluate (test) with the
config, fits the baselines on the same bundle, and prints one table (Recall@20, Recall@40, NDCG@20,
NDCG@100, train time) in CLLM4Rec's recall convention (hits / min(K, |held-out|)); RecBole's
hits / |held-out| is in the JSON as recall_recbole@K. The machine, config and seed go into the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import baselines  # noqa: E402
import evaluate  # noqa: E402
import finetune  # noqa: E402
import pretrain  # noqa: E402

from common.config import read_yaml  # noqa: E402
from common.log import setup_logging  # noqa: E402
from data_prep.build import build_ml100k_reference  # noqa: E402
from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402

COLUMNS = ["recall@20", "recall@40", "ndcg@20", "ndcg@100", "recall_recbole@20", "train_s"]


def ensure_bundle(data: Path, shared: Path) -> None:
    if not (data / "manifest.json").exists():
        build_ml100k_reference(shared, data)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "ml-100k-cpu.yaml"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_ml100k.json"))
    parser.add_argument("--skip_llm", action="store_true", help="baselines only")
    args = parser.parse_args()
    setup_logging()

    data = Path(read_yaml(args.config)["data"])
    ensure_bundle(data, Path(args.shared))
    rows: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    if not args.skip_llm:
        for stage in (pretrain, finetune):
            start = time.perf_counter()
            stage.main(["--config", args.config])
            timings[stage.__name__] = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate.main(["--config", args.config, "--split", "test"])
        timings["evaluate"] = time.perf_counter() - start
        rows["llmrec (CLLM4Rec)"] = {**metrics, "train_s": timings["pretrain"] + timings["finetune"]}
    for name, metrics in baselines.main(["--data", str(data), "--split", "test"]).items():
        rows[name] = {**metrics, "train_s": metrics["fit_s"]}
    print(f"ML-100K fixed random split, test; recall = hits / min(K, |held-out|); config {args.config}")
    print(format_table(rows, COLUMNS))
    write_metrics_json(
        args.out,
        rows,
        config_file=args.config,
        config=read_yaml(args.config),
        timings_s=timings,
        machine=machine_info(),
    )


if __name__ == "__main__":
    main()
