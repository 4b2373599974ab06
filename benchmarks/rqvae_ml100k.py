"""Item-indexing quality on ML-100K: RQ-VAE semantic IDs (both collision resolutions) against random,
sequential and collaborative IDs, plus SentencePiece pieces over the RQ-VAE codes.

    python benchmarks/rqvae_ml100k.py [--data data/ml-100k] [--ae_epochs N] [--epochs N] [--decoder_epochs N] [--seed 0] [--out FILE.json]

A missing --data bundle is built from ../shared (fixed ml-100k-random split) first.
Item text (for MiniLM embeddings) comes from the bundle; genres for the genre-sharing ratio come from
the ``class`` column of ml-100k.item. Prints a table and writes JSON (default
benchmarks/results/rqvae_ml100k.json) with the machine, config and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd

from common.log import setup_logging
from data_prep import load_bundle
from data_prep.build import build_ml100k_reference
from llmrec.indexing import IndexData, PiecesConfig, RQVAEConfig, RQVAEIndexer, make_indexer, train_pieces
from llmrec.indexing.base import shared_attribute_ratio
from llmrec.indexing.encoders import item_embeddings
from llmrec.indexing.rqvae import train_rqvae
from llmrec.reporting import machine_info, timed, write_report

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def genres_by_item(item_file: Path, raw_ids: list[str]) -> list[set[str]]:
    table = pd.read_csv(item_file, sep="\t", dtype=str, keep_default_na=False)
    genres = dict(zip(table["item_id:token"], table["class:token_seq"].str.split(), strict=True))
    return [set(genres[raw]) for raw in raw_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=str(REPO / "data" / "ml-100k"), help="ML-100K bundle (built if missing)"
    )
    parser.add_argument("--item_file", default=str(SHARED / "datasets" / "ml-100k" / "ml-100k.item"))
    parser.add_argument("--ae_epochs", type=int, default=RQVAEConfig.ae_epochs, help="autoencoder epochs")
    parser.add_argument("--epochs", type=int, default=RQVAEConfig.epochs, help="quantized RQ-VAE epochs")
    parser.add_argument(
        "--decoder_epochs", type=int, default=RQVAEConfig.decoder_epochs, help="decoder-only epochs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pieces", default="1024,2048,4096", help="SentencePiece vocab sizes")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rqvae_ml100k.json"))
    args = parser.parse_args()
    setup_logging()

    data_dir = Path(args.data)
    build_ml100k_reference(SHARED, data_dir, exist_ok=True)
    bundle = load_bundle(data_dir)
    genres = genres_by_item(Path(args.item_file), bundle.item_ids)
    start = time.perf_counter()
    emb = item_embeddings(bundle.item_text, "minilm", cache_dir=data_dir / "embeddings")
    encode_s = time.perf_counter() - start
    data = IndexData(bundle.n_items, interactions=bundle.interactions("train"), embeddings=emb)

    config = RQVAEConfig(
        ae_epochs=args.ae_epochs, epochs=args.epochs, decoder_epochs=args.decoder_epochs, seed=args.seed
    )
    train_s, train_cpu_s, trained = timed(lambda: train_rqvae(emb, config))
    indexes = {
        f"rqvae+{resolve}": RQVAEIndexer(dataclasses.replace(config, resolve=resolve)).index_from(trained)
        for resolve in ("sinkhorn", "extra_level")
    }
    for method in ("random", "sequential", "collaborative"):
        indexes[method] = make_indexer(method, seed=args.seed).build(data)
    pieces = {
        int(v): train_pieces(indexes["rqvae+sinkhorn"], PiecesConfig(vocab_size=int(v), seed=args.seed))
        for v in args.pieces.split(",")
    }

    rows = {}
    for name, index in indexes.items():
        s = index.stats
        rows[name] = {
            "unique": index.is_unique(),
            "levels": index.max_len,
            "collision_before": s.get("collision_rate_before", s["collision_rate"]),
            "collision_after": s["collision_rate"],
            "util_first": s["utilisation"][0],
            "perplexity_first": s["perplexity"][0],
            "genre_sharing": shared_attribute_ratio(index.codes[:, 0], genres),
            "stats": s,
        }
    header = f"{'index':<22}{'unique':>7}{'levels':>7}{'coll.before':>12}{'coll.after':>11}{'util L0':>9}{'ppl L0':>8}{'genre ratio':>12}"
    print(header)
    for name, r in rows.items():
        print(
            f"{name:<22}{r['unique']!s:>7}{r['levels']:>7}{r['collision_before']:>12.4f}{r['collision_after']:>11.4f}"
            f"{r['util_first']:>9.3f}{r['perplexity_first']:>8.1f}{r['genre_sharing']['ratio']:>12.2f}"
        )
    s = indexes["rqvae+sinkhorn"].stats
    print(f"\nRQ-VAE reconstruction MSE {s['recon_mse_before']:.6f} (k-means init) -> {s['recon_mse']:.6f}")
    print("level  utilisation  perplexity   (rqvae+sinkhorn)")
    for k, (u, p) in enumerate(zip(s["utilisation"], s["perplexity"], strict=True)):
        print(f"{k:>5}  {u:>11.4f}  {p:>10.2f}")
    print("\nSentencePiece pieces over the RQ-VAE codes (fixed form: 3 tokens/item)")
    print(f"{'vocab asked':>11}{'vocab':>7}{'tokens/item':>13}{'unique':>8}")
    for asked, p in pieces.items():
        print(
            f"{asked:>11}{p.stats['vocab_size']:>7}{p.stats['mean_tokens_per_item']:>13.3f}{p.is_unique()!s:>8}"
        )
    print(
        f"\nMiniLM encoding {encode_s:.1f}s (0 if cached), RQ-VAE training {train_s:.1f}s wall, {train_cpu_s:.1f}s CPU"
    )

    result = {
        "machine": machine_info(),
        "config": {"rqvae": dataclasses.asdict(config), "seed": args.seed, "data": str(data_dir)},
        "seconds": {"encode": encode_s, "rqvae_train": train_s, "rqvae_train_cpu": train_cpu_s},
        "indexes": rows,
        "pieces": {str(k): p.stats for k, p in pieces.items()},
    }
    write_report(args.out, result)


if __name__ == "__main__":
    main()
