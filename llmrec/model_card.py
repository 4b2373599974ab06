"""The model card an export writes as the bundle's ``README.md``: what the model was trained on, how, how
well it ranks and how to use it, as model repositories on the Hugging Face hub carry.

Everything in it comes from the artefacts (the dataset bundle's manifest; the run's ``run_config.json``,
``metrics.jsonl`` and ``metrics.json``, as `llmrec.run.Run` read them), never typed: a run never evaluated
says so. Plain Markdown from
the standard library: the hub's card templates (``huggingface_hub.ModelCard``) bring a Jinja dependency and
hub metadata for a file read by people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import __version__

if TYPE_CHECKING:
    from llmrec.run import Run

CARD_FILE = "README.md"
PROTOCOL = (
    "Full ranking over the whole catalogue; a user's training items are excluded (and the validation "
    "items, for test). Recall@K = hits / min(K, |held-out|) (Mult-VAE, CLLM4Rec); recall_recbole@K = hits / "
    "|held-out| (RecBole); NDCG@K with binary relevance and the ideal DCG over min(K, |held-out|). On a "
    "leave-one-out split, HR@K and NDCG@K of the one held-out item, from the training items (plus the "
    "validation item, for test). Code: `llmrec.metrics.evaluate_scorer`."
)
SHOWN = ("recall@20", "recall@40", "ndcg@20", "ndcg@100", "hr@10", "ndcg@10", "recall_recbole@20")


def metrics_table(metrics: dict[str, dict[str, float]]) -> list[str]:
    columns = [c for c in SHOWN if any(c in m for m in metrics.values())]
    if not metrics or not columns:
        return ["No evaluation is recorded in the run: run `recipes/evaluate.py --run RUN` before exporting."]
    lines = ["| evaluation | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in metrics.items():
        cells = [f"{values[c]:.4f}" if isinstance(values.get(c), (int, float)) else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def model_card(
    manifest: dict[str, Any], config: dict[str, Any], source: dict[str, Any], run: Run | None = None
) -> str:
    """The card's Markdown from the dataset ``manifest``, the export's ``config`` (``backbone`` and ``model``:
    the configs as dicts, ``templates``, ``dtype``, ``generate``: a generator bundle's beam and prompt), its
    ``source`` and the ``run`` it was exported from, if any (`llmrec.run.Run`: its config and metrics)."""
    run_config = run.config if run is not None else None
    counts = manifest.get("counts", {})
    split = manifest.get("split", {})
    backbone, model = config["backbone"], config["model"]
    lines = [
        f"# llmrec recommender: {Path(str(manifest.get('source', {}).get('input', 'dataset'))).name}",
        "",
        f"A recommender bundle exported by llmrec {__version__}: a causal LM ({backbone['name_or_path']}"
        + (f", first {backbone['num_layers']} layers" if backbone.get("num_layers") else "")
        + (
            f") with ID tokens and a LoRA adapter that writes an item's semantic ID, ranked by constrained beam "
            f"search (beam {config['generate']['beam']}) over the item index in `index/`."
            if config.get("generate")
            else ") with ID tokens, a LoRA adapter and an item head that scores the whole catalogue in one forward."
        ),
        "",
        "## Data and split",
        f"- source: {manifest.get('source', {}).get('format', '?')} files `{manifest.get('source', {}).get('input', '?')}`",
        "- " + ", ".join(f"{value} {name}" for name, value in counts.items() if isinstance(value, (int, float))),
        f"- split: `{json.dumps({k: v for k, v in split.items() if not isinstance(v, (dict, list))})}`",
        "",
        "## Recipe",
        f"- backbone: `{backbone['name_or_path']}`, weights as {config['dtype']}",
        "- model: " + ", ".join(f"{k}={model[k]}" for k in ("head", "lora_r", "history_pool", "prior", "max_doc_tokens") if k in model),
        f"- known users' prompt: `{config['templates']['user']}`; unseen users': `{config['templates']['cold']}`",
    ]  # fmt: skip
    if run_config is not None:  # the run's flat record of every option (llmrec.train)
        keys = ("task", "target", "mask_ratio", "init", "lr", "epochs", "max_steps", "batch_size", "seed")
        shown = ", ".join(f"{k}={run_config[k]}" for k in keys if k in run_config)
        lines.append(f"- run `{run.path}` (all options in its `run_config.json`): {shown}")
    lines += ["", "## Metrics", "", *metrics_table(run.metrics if run else {}), "", PROTOCOL, ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from llmrec import Recommender",
        'rec = Recommender.from_pretrained("THIS_DIRECTORY", device="cpu")',
        'rec.recommend(user="RAW_USER_ID", k=10)            # a user seen in training',
        'rec.recommend(history=["RAW_ITEM_ID", ...], k=10)  # a user unseen in training',
        "```",
        "",
        "```bash",
        "python recipes/serve.py --bundle THIS_DIRECTORY --port 8000   # HTTP service, page at /, API at /docs",
        "```",
        "",
        "The backbone is not in the bundle: loading finds it by name and checks the fingerprint recorded in "
        "`config.json`, which also holds the sha256 of every file. Files are JSON and safetensors only (no pickle).",
        "",
    ]
    return "\n".join(lines)
