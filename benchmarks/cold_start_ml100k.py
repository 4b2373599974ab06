"""Cold start on ML-100K: 10% of the items never seen in training, ranked from their text.

    python benchmarks/cold_start_ml100k.py [--config recipes/configs/cold-ml-100k-cpu.yaml] [--reuse]
        [--zeroshot_users 30] [--zeroshot_layers N] [--out FILE.json]
    python benchmarks/cold_start_ml100k.py --add_items_only [--repeats 5]   # the cost of adding items only
    python benchmarks/cold_start_ml100k.py --generator [--reuse]   # the semantic-ID generator's cold items

Builds the cold-items bundle (``--cold_ratio 0.1 --seed 0``; 84 valid-cold and 84 test-cold items),
trains llmrec on it with the config (``--reuse``: take the config's finetune run as it is), then gives
the cold items rows from their text in several ways (``llmrec.coldstart``) and reports, on valid and
test, Recall@20 / NDCG@20 over the cold items only and over the whole catalogue, beside content kNN
(MiniLM), popularity, random and EASE (EASE and popularity cannot score unseen items: their cold rows
are left out). The cold-start method is chosen on valid cold NDCG@20.

The llmrec variants share one forward pass per user: no training history holds a cold item (checked),
so a user's last hidden state does not depend on the cold items' rows, and each variant only changes
the item head. The zero-shot LM (an untouched SmolLM2, all 30 layers by default) scores the test-cold
items' titles for a seeded sample of ``--zeroshot_users`` users, the other models are re-scored on the
same users for that table, and the cost per user is printed. Also timed, per 100 items: fold-in, and
``Recommender.add_items`` on the run exported as a bundle (:func:`add_items_cost`; ``--add_items_only``
times only that, on the config's finetune run). Fold-in runs the content LM (a softmax over the whole word
vocabulary at every text position) for ``--fold_in_steps`` steps, so it is the costly part of this script
on a CPU.

``--generator`` measures the semantic-ID generator instead (``--generator_config``): the RQ-VAE index is
fit without the cold items, which get their codes as items added later do (``recipes/index.py`` on a
cold-items bundle), the generator is trained on the split, and each split is ranked by constrained beam
search twice: over the whole trie (``all``) and over the cold items' part of it only (``cold``), beside
content kNN, popularity and random on the same views.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import finetune  # noqa: E402
import index  # noqa: E402
import pretrain  # noqa: E402

from common.config import read_yaml  # noqa: E402
from common.log import setup_logging  # noqa: E402
from data_prep import load_bundle  # noqa: E402
from data_prep.build import BuildConfig, build  # noqa: E402
from data_prep.cold import cold_ids  # noqa: E402
from llmrec.backbone import load_backbone  # noqa: E402
from llmrec.baselines import EASE, ContentKNN, Pop, Random  # noqa: E402
from llmrec.coldstart import fold_in, fold_in_items, relate, warm_items  # noqa: E402
from llmrec.export import export_model  # noqa: E402
from llmrec.indexing import ItemIndex  # noqa: E402
from llmrec.indexing.encoders import item_embeddings, torch_threads  # noqa: E402
from llmrec.mapper import (  # noqa: E402
    TextToID,
    embed_texts,
    item_rows,
    item_texts,
    neighbour_rows,
    set_item_rows,
)
from llmrec.metrics import evaluate_cold_items, format_table, write_metrics_json  # noqa: E402
from llmrec.model import CLLM4Rec  # noqa: E402
from llmrec.pipeline import cold_view_scorers, scorer_for  # noqa: E402
from llmrec.recommender import Recommender  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402
from llmrec.run import run_model  # noqa: E402
from llmrec.zeroshot import PromptConfig, ZeroShotScorer  # noqa: E402

COLUMNS = ["cold r@20", "cold n@20", "all r@20", "all n@20", "seconds"]
# baselines whose cold view means nothing: popularity's all-zero scores of unseen items leave the ranking
# to the tie-break by item index (ML-100K's low ids are its popular films)
CANNOT = {"popularity": "no signal for unseen items", "EASE": "cannot score unseen items"}


@torch.no_grad()
def user_hidden(model: CLLM4Rec, bundle, batch_size: int = 32) -> torch.Tensor:
    """Every user's last prompt hidden state (the input of the item head), one forward pass each."""
    model.eval()
    scorer = scorer_for(bundle, model, batch_size)
    return torch.cat([model.last_hidden(*batch) for batch in scorer.batches(np.arange(bundle.n_users))])


class Scores:
    """A scoring function as a `llmrec.metrics.Scorer` (the variants below swap rows or score subsets)."""

    def __init__(self, fn):
        self.fn = fn

    def score(self, users: np.ndarray):
        return self.fn(users)


def row(views: dict[str, dict], seconds: float, name: str = "") -> dict[str, float]:
    """One table row of ``name``'s two views (nan in the cold columns of a :data:`CANNOT` baseline)."""
    blank = name in CANNOT
    return {
        "cold r@20": float("nan") if blank else views["cold"]["recall@20"],
        "cold n@20": float("nan") if blank else views["cold"]["ndcg@20"],
        "all r@20": views["all"]["recall@20"],
        "all n@20": views["all"]["ndcg@20"],
        "seconds": seconds,
        "cold_users": views["cold"]["users"],
        "all_users": views["all"]["users"],
    }


def add_items_cost(run: Path, bundle, cold: np.ndarray, repeats: int) -> dict[str, float]:
    """Seconds of ``Recommender.add_items`` for 100 of the ``cold`` items (title and text), on ``run``
    exported as a bundle: the first call in the process (it loads MiniLM); the steady state (the median of
    ``repeats`` more calls, fresh ids each; also in CPU seconds, which a busy machine inflates less); the
    MiniLM encoding alone on one thread (add_items's) and on torch's threads (medians of ``repeats``); the
    first call on a bundle exported without its mapper (as older exports were: that call fits the mapper,
    encoding every item's text). Also the export, with and without the mapper."""
    texts = item_texts(bundle.item_titles, bundle.item_text)
    new = cold[:100]

    def items(tag: str) -> list[dict[str, str]]:
        return [
            {"id": f"{tag}-{i}", "title": bundle.item_titles[c], "text": bundle.item_text[c]}
            for i, c in enumerate(new)
        ]

    def seconds(fn, *args, **kwargs) -> float:
        start = time.perf_counter()
        fn(*args, **kwargs)
        return time.perf_counter() - start

    model = run_model(run).eval()
    costs: dict[str, float] = {"load_average_before": os.getloadavg()[0]}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {mapper: Path(tmp) / f"mapper-{mapper}" for mapper in (True, False)}
        for mapper, out in bundles.items():  # the item embeddings come from the dataset's cache
            name = f"export_{'with' if mapper else 'without'}_mapper_s"
            costs[name] = seconds(export_model, model, bundle, out, mapper=mapper)
        rec = Recommender.from_pretrained(bundles[True], device="cpu")
        costs["first_call_s"] = seconds(rec.add_items, items("first"))
        cpu = time.process_time()
        steady = [seconds(rec.add_items, items(f"r{r}")) for r in range(repeats)]
        costs["steady_cpu_s_mean"] = (time.process_time() - cpu) / repeats  # CPU seconds: the load aside
        costs["steady_s_median"] = float(np.median(steady))
        costs["steady_s_min"], costs["steady_s_max"] = min(steady), max(steady)
        new_texts = [texts[i] for i in new]
        for name, n in (("encode_s_1_thread", 1), (f"encode_s_{threads}_threads", None)):
            with torch_threads(n):
                costs[name] = float(np.median([seconds(embed_texts, new_texts) for _ in range(repeats)]))
        old = Recommender.from_pretrained(bundles[False], device="cpu")
        costs["no_mapper_first_call_s"] = seconds(old.add_items, items("old"))
    costs["load_average_after"] = os.getloadavg()[0]
    return costs


def print_add_items_cost(costs: dict[str, float], fold_in_s: float | None = None) -> None:
    rows = {
        "bundle with its mapper: first call (loads MiniLM)": costs["first_call_s"],
        "bundle with its mapper: steady state (median)": costs["steady_s_median"],
        "  the same in CPU seconds (process time, mean)": costs["steady_cpu_s_mean"],
        "  MiniLM encoding of the 100 texts, 1 thread": costs["encode_s_1_thread"],
        f"  the same, torch's {torch.get_num_threads()} threads": costs[
            f"encode_s_{torch.get_num_threads()}_threads"
        ],
        "bundle without mapper (older export): first call, fits it": costs["no_mapper_first_call_s"],
    }
    if fold_in_s is not None:
        rows["fold-in (all cold items, scaled to 100)"] = fold_in_s
    print(
        f"\nadding 100 items (Recommender.add_items; {os.cpu_count()} CPUs, torch {torch.get_num_threads()} "
        f"threads, load average {costs['load_average_before']:.1f} before, {costs['load_average_after']:.1f} after); "
        f"steady state min {costs['steady_s_min']:.2f} s, max {costs['steady_s_max']:.2f} s; export "
        f"{costs['export_with_mapper_s']:.1f} s with the mapper, {costs['export_without_mapper_s']:.1f} s without"
    )
    print(format_table({name: {"s per 100 items": s} for name, s in rows.items()}, ["s per 100 items"]))


def run_generator(args, bundle, data: Path, results_dir: Path) -> None:
    """The generator's cold items (``--generator``): index without them, train, rank both views."""
    config = read_yaml(args.generator_config)
    index_dir, run = Path(config["model"]["index"]), Path(config["finetune"]["train"]["output_dir"])
    if Path(config["data"]) != data:
        raise SystemExit(f"{args.generator_config}: data {config['data']} is not the bundle {data}")
    timings: dict[str, float] = {}
    if not args.reuse:
        start = time.perf_counter()
        index.main(["--data", str(data), "--method", "rqvae", "--codebook_size", "64", "--out", str(index_dir)]
                   + ["--overwrite"])  # fmt: skip
        timings["index"] = time.perf_counter() - start
        finetune.main(["--config", args.generator_config, "--output_dir", str(run), "--overwrite_output_dir"])
        timings["finetune"] = time.perf_counter() - start - timings["index"]
    model = run_model(run).eval()
    beam = int(config["finetune"]["eval_beam"])
    emb = item_embeddings(
        item_texts(bundle.item_titles, bundle.item_text), "minilm", cache_dir=data / "embeddings"
    )
    train, valid = bundle.matrix("train"), bundle.matrix("valid")
    baselines = {
        "content kNN (MiniLM, mean profile)": ContentKNN(emb).fit(train, valid),
        "popularity": Pop().fit(train, valid),
        "random": Random(args.seed).fit(train, valid),
    }
    name = f"llmrec semantic-ID generator (beam {beam}, cold items by their codes)"
    results: dict[str, dict] = {name: {}, **{n: {} for n in baselines}}
    for split_name in ("valid", "test"):
        cold = cold_ids(bundle.manifest, "items", split_name)
        start = time.perf_counter()
        scorer, cold_scorer = cold_view_scorers(bundle, model, split_name, cold, beam)
        views = evaluate_cold_items(scorer, bundle, split_name, cold, ks=(10, 20), cold_scorer=cold_scorer)
        results[name][split_name] = row(views, time.perf_counter() - start)
        for base, model_ in baselines.items():
            views = evaluate_cold_items(
                Scores(model_.score), bundle, split_name, cold, ks=(10, 20), progress=False
            )
            results[base][split_name] = row(views, 0.0, base)
    for split_name in ("valid", "test"):
        print(f"\n{split_name}: cold = ranking among the {split_name} cold items only; all = whole catalogue")
        print(format_table({n: r[split_name] for n, r in results.items()}, COLUMNS))
    results[name]["index"] = ItemIndex.read(index_dir).stats
    write_metrics_json(
        args.out or results_dir / "cold_start_generator_ml100k.json",
        results,
        run=str(run),
        timings_s=timings,
        config_file=args.generator_config,
        config=config,
        args=vars(args),
        machine=machine_info(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "cold-ml-100k-cpu.yaml"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--cold_ratio", type=float, default=0.1)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="use the config's finetune run as it is")
    parser.add_argument("--fold_in_steps", type=int, default=10)
    parser.add_argument("--fold_in_lr", type=float, default=3e-2)
    parser.add_argument("--combined", action="store_true", help="also fold-in started from the mapper's rows")
    parser.add_argument("--zeroshot_users", type=int, default=30, help="0: skip the zero-shot LM")
    parser.add_argument("--zeroshot_layers", type=int, default=None, help="default: all 30 layers")
    parser.add_argument("--seed", type=int, default=0, help="user sample and random baseline")
    parser.add_argument(
        "--add_items_only", action="store_true", help="only time add_items on the config's finetune run"
    )
    parser.add_argument("--repeats", type=int, default=5, help="add_items calls timed for the steady state")
    parser.add_argument(
        "--generator", action="store_true", help="only the semantic-ID generator's cold items"
    )
    parser.add_argument(
        "--generator_config", default=str(REPO / "recipes" / "configs" / "cold-ml-100k-sid-cpu.yaml")
    )
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/<cold_start|add_items>_ml100k.json"
    )
    args = parser.parse_args()
    results_dir = REPO / "benchmarks" / "results"
    setup_logging()
    config = read_yaml(args.config)
    data = Path(config["data"])
    if not (data / "manifest.json").exists():
        build(
            BuildConfig(
                input=str(Path(args.shared) / "datasets" / "ml-100k"),
                out=str(data),
                split="cold-items",
                cold_ratio=args.cold_ratio,
                seed=args.split_seed,
            )
        )
    bundle = load_bundle(data)
    split = bundle.manifest["split"]
    print(f"bundle {data}: {split['protocol']} cold_ratio {split['cold_ratio']} seed {split['seed']}")
    cold_all = cold_ids(bundle.manifest, "items")
    if args.generator:
        run_generator(args, bundle, data, results_dir)
        return
    run = Path(config["finetune"]["train"]["output_dir"])
    if args.add_items_only:
        costs = add_items_cost(run, bundle, cold_all, args.repeats)
        print_add_items_cost(costs)
        write_metrics_json(
            args.out or results_dir / "add_items_ml100k.json",
            costs,
            run=str(run),
            config_file=args.config,
            args=vars(args),
            machine=machine_info(),
        )
        return
    timings: dict[str, float] = {}
    if not args.reuse:
        for stage in (pretrain, finetune):
            start = time.perf_counter()
            stage.main(["--config", args.config, "--overwrite_output_dir"])
            timings[stage.__name__] = time.perf_counter() - start
    model = run_model(run).eval()
    histories = bundle.histories("train")
    assert not set(cold_all.tolist()) & {i for h in histories for i in h}, (
        "a training history holds a cold item"
    )

    start = time.perf_counter()
    hidden = user_hidden(model, bundle)
    timings["user_forward_s"] = time.perf_counter() - start
    texts = item_texts(bundle.item_titles, bundle.item_text)
    start = time.perf_counter()
    emb = item_embeddings(texts, "minilm", cache_dir=data / "embeddings")
    timings["minilm_all_items_s"] = time.perf_counter() - start
    warm = warm_items(bundle.matrix("train"), bundle.n_items)
    trained = item_rows(model)

    def llmrec_scores(users: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model.item_logits(hidden[torch.as_tensor(users)]).float()

    def evaluate(score_fn, users=None) -> dict[str, dict]:
        out = {}
        for name in ("valid", "test"):
            cold = cold_ids(bundle.manifest, "items", name)
            out[name] = evaluate_cold_items(Scores(score_fn), bundle, name, cold, users=users, progress=False)
        return out

    # --------------------------------------------------------------- llmrec variants
    variants: dict[str, tuple[float, torch.Tensor]] = {}
    results: dict[str, dict] = {}

    def restore() -> None:
        set_item_rows(model, cold_all, trained[cold_all])

    def record(name: str, seconds: float, scores=llmrec_scores) -> None:
        """Evaluate the model as it stands now (or ``scores``) and print a line at once."""
        if scores is llmrec_scores:
            variants[name] = (seconds, item_rows(model))
        results[name] = {"seconds": seconds, **evaluate(scores)}
        test = results[name]["test"]
        print(
            f"{name}: test cold R@20 {test['cold']['recall@20']:.4f} N@20 {test['cold']['ndcg@20']:.4f}, "
            f"all R@20 {test['all']['recall@20']:.4f} N@20 {test['all']['ndcg@20']:.4f} ({seconds:.1f} s)",
            flush=True,
        )

    record("llmrec, no cold-start (rows as trained)", 0.0)
    start = time.perf_counter()
    mapper = TextToID.fit(model, emb, warm)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    mapper.apply(model, cold_all, emb[cold_all])
    record("llmrec + mapper (MiniLM -> rows)", fit_s + time.perf_counter() - start)
    restore()
    start = time.perf_counter()
    neighbour_rows(model, emb, warm, cold_all)
    record("llmrec + 20 text neighbours' rows", time.perf_counter() - start)
    restore()
    # --------------------------------------------------------------- baselines
    train, valid = bundle.matrix("train"), bundle.matrix("valid")
    baselines = {
        "content kNN (MiniLM, mean profile)": ContentKNN(emb),
        "popularity": Pop(),
        "random": Random(args.seed),
        "EASE": EASE(),
    }
    for name, baseline in baselines.items():
        start = time.perf_counter()
        baseline.fit(train, valid)
        record(name, time.perf_counter() - start, baseline.score)

    fold = {"steps": args.fold_in_steps, "lr": args.fold_in_lr}
    cold_texts = [texts[i] for i in cold_all]
    start = time.perf_counter()
    content = fold_in(model, cold_all, cold_texts, bundle.templates.item, **fold)
    fold_s = time.perf_counter() - start
    for relation in ("linear", "identity"):
        start = time.perf_counter()
        relate(model, cold_all, content, warm, relation)
        seconds = fold_s + time.perf_counter() - start
        record(f"llmrec + fold-in ({relation} relation)", seconds)
        restore()
    if args.combined:
        start = time.perf_counter()
        mapper.apply(model, cold_all, emb[cold_all])
        fold_in_items(model, cold_all, cold_texts, bundle.templates.item, warm, "linear", **fold)
        record("llmrec + mapper, then fold-in", fit_s + time.perf_counter() - start)
        restore()

    best = max(
        (n for n in results if n.startswith("llmrec +")), key=lambda n: results[n]["valid"]["cold"]["ndcg@20"]
    )
    tables = {}
    for split_name in ("valid", "test"):
        rows = {}
        for name, result in results.items():
            r = row(result[split_name], result["seconds"], name)
            rows[name + (" [chosen on valid]" if name == best else "")] = r
        tables[split_name] = rows
        print(f"\n{split_name}: cold = ranking among the {split_name} cold items only; all = whole catalogue")
        print(format_table(rows, COLUMNS))
    print("nan: " + "; ".join(f"{k}: {v}" for k, v in CANNOT.items()))
    knn = results["content kNN (MiniLM, mean profile)"]["test"]["cold"]
    mine = results[best]["test"]["cold"]
    ratio = {k: mine[k] / knn[k] for k in ("recall@20", "ndcg@20")}
    print(
        f"chosen: {best}; test cold vs content kNN: R@20 x{ratio['recall@20']:.2f}, N@20 x{ratio['ndcg@20']:.2f}"
    )

    # --------------------------------------------------------------- cost of adding items
    costs = add_items_cost(run, bundle, cold_all, args.repeats)
    costs["fold_in_s_per_100"] = fold_s * 100 / len(cold_all)  # timed above on every cold item
    print_add_items_cost(costs, costs["fold_in_s_per_100"])

    # --------------------------------------------------------------- zero-shot LM on cold items
    zeroshot = {}
    if args.zeroshot_users:
        test_cold = cold_ids(bundle.manifest, "items", "test")
        has_cold = np.flatnonzero(np.asarray(bundle.matrix("test")[:, test_cold].sum(axis=1)).ravel() > 0)
        users = np.sort(np.random.default_rng(args.seed).choice(has_cold, args.zeroshot_users, replace=False))
        lm, tokenizer = load_backbone(config["backbone"]["name_or_path"], num_layers=args.zeroshot_layers)
        scorer = ZeroShotScorer(lm, tokenizer, bundle.item_titles, PromptConfig(), candidates=test_cold)
        start = time.perf_counter()
        scorer.neutral()
        neutral_s = time.perf_counter() - start
        scores = {}
        start = time.perf_counter()
        for user in users:
            scores[int(user)] = scorer.variants(scorer.likelihoods(histories[user]))
        per_user = (time.perf_counter() - start) / len(users)

        def zs(variant: str):
            def score(batch: np.ndarray) -> torch.Tensor:
                out = torch.full((len(batch), bundle.n_items), -1e9, dtype=torch.float64)
                for row_, user in enumerate(batch):
                    out[row_, torch.as_tensor(test_cold)] = scores[int(user)][variant]
                return out

            return score

        same_users = {f"zero-shot SmolLM2 ({v})": zs(v) for v in ("sum", "mean", "calibrated")}
        same_users["content kNN (MiniLM, mean profile)"] = baselines[
            "content kNN (MiniLM, mean profile)"
        ].score
        same_users["random"] = Random(args.seed).fit(train).score
        set_item_rows(model, cold_all, variants[best][1][cold_all])
        same_users[best] = llmrec_scores
        rows = {}
        for name, fn in same_users.items():
            views = evaluate_cold_items(Scores(fn), bundle, "test", test_cold, users=users, progress=False)
            rows[name] = {"cold r@20": views["cold"]["recall@20"], "cold n@20": views["cold"]["ndcg@20"]}
        restore()
        layers = args.zeroshot_layers or lm.config.num_hidden_layers
        print(
            f"\nzero-shot on {len(users)} seeded test users (seed {args.seed}) with cold test items, ranking the "
            f"{len(test_cold)} test-cold items; SmolLM2-135M, {layers} layers: {per_user:.1f} s per user, "
            f"neutral prompt {neutral_s:.1f} s once"
        )
        print(format_table(rows, ["cold r@20", "cold n@20"]))
        zeroshot = {"users": users.tolist(), "layers": layers, "s_per_user": per_user, "rows": rows}

    write_metrics_json(
        args.out or results_dir / "cold_start_ml100k.json",
        {name: {k: v for k, v in result.items()} for name, result in results.items()},
        chosen=best,
        vs_knn=ratio,
        add_items_cost=costs,
        zeroshot=zeroshot,
        timings_s=timings,
        config_file=args.config,
        config=config,
        args=vars(args),
        machine=machine_info(),
    )


if __name__ == "__main__":
    main()
