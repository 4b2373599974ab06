"""The configs of the recipes, and the choices their help names, importable without torch, peft or
transformers' models.

Recipes parse their command line into these dataclasses before they import the model stack, so that
``--help`` and argument errors answer at once (tests/test_startup.py). The modules that use them
(`llmrec.backbone`, `llmrec.model`, `llmrec.train`, `llmrec.zeroshot`, `llmrec.indexing`) re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

from common.config import require

if TYPE_CHECKING:
    from peft import LoraConfig

ALLOW_DOWNLOAD_ENV = "LLMREC_ALLOW_DOWNLOAD"
CACHE_ENV = "LLMREC_CACHE"
PRETRAIN_CORPORA = ("collaborative", "content")
# every choice a config offers, as a Literal type (checked by the parser, listed by --help) and a tuple
HistoryPool = Literal["none", "mean"]
HISTORY_POOLS = get_args(HistoryPool)
SemanticHistory = Literal["codes", "codes_item"]  # how task semantic_sequence writes a history item
SEMANTIC_HISTORIES = get_args(SemanticHistory)
Prior = Literal["none", "ease"]
PRIORS = get_args(Prior)
UserTable = Literal["full", "none", "hashed", "lowrank"]  # how user rows are stored (llmrec.id_tables)
USER_TABLES = get_args(UserTable)
Head = Literal["tied", "untied"]  # the item head's rows (llmrec.head.ItemHead)
HEADS = get_args(Head)
EmbeddingInit = Literal["normal", "title_mean", "semantic_sum"]
CodeInit = Literal["normal", "title_mean"]
MixedPrecision = Literal["no", "bf16", "fp16"]
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
WeightDtype = Literal["fp32", "fp16", "bf16"]  # of exported weights; llmrec.bundle.DTYPES maps them
WEIGHT_DTYPES = get_args(WeightDtype)
# finetuning tasks; llmrec.pipeline.FINETUNE_TASKS gives each its prompt kind
FinetuneTask = Literal["multinomial", "semantic", "both", "sequential", "semantic_next", "semantic_sequence"]
# the prompt a finetuning task trains on (llmrec.pipeline.prompt_template), which a bundle serves its users
PromptKind = Literal["masked", "sequence", "semantic_sequence"]
PROMPT_KINDS = get_args(PromptKind)
Split = Literal["test", "valid"]  # a split that recipes report (test) or select on (valid)
BASELINE_NAMES = ("pop", "ease", "multvae", "sasrec", "random", "knn")  # llmrec.baselines.BASELINES
EASE_LAMBDAS = (10.0, 50.0, 100.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0)  # EASE's L2 grid


def require_seed(seed: int, name: str = "seed") -> None:
    """Seeds are non-negative (numpy refuses the others, deep inside a run)."""
    require(seed >= 0, name, seed, "must be >= 0")


@dataclass
class BackboneConfig:
    """Which causal LM to load and how; embed it in a recipe's config or pass it to :func:`load_backbone`."""

    section: ClassVar[str] = "backbone"  # its YAML section (llmrec.config)

    name_or_path: str = field(
        default="smollm2-135m",
        metadata={
            "help": "smollm2-135m, tiny-llama, tiny-gpt2, a *.gguf file, a local checkpoint dir or a hub id"
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": f"where converted GGUF checkpoints (and hub downloads) are cached; default ${CACHE_ENV} "
            "or ~/.cache/llmrec/backbones"
        },
    )
    num_layers: int | None = field(default=None, metadata={"help": "keep only the first N decoder layers"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load weights in 4 bit (bitsandbytes nf4)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load weights in 8 bit (bitsandbytes)"})
    dtype: Dtype | None = field(default=None, metadata={"help": "weights' dtype (default: the checkpoint's)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "run modelling code shipped with a hub model"}
    )
    allow_download: bool = field(
        default=False, metadata={"help": f"allow hub downloads (also enabled by {ALLOW_DOWNLOAD_ENV}=1)"}
    )

    def __post_init__(self) -> None:
        # Keep the config JSON-serialisable (it is saved with trained models): torch.bfloat16 -> "bfloat16".
        if self.dtype is not None and not isinstance(self.dtype, str):
            self.dtype = str(self.dtype).removeprefix("torch.")


@dataclass
class ModelConfig:
    """How the recommender is built on a backbone (the backbone itself is a `BackboneConfig`)."""

    section: ClassVar[str] = "model"  # its YAML section (llmrec.config)

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated module names, 'all-linear', or empty for peft's per-architecture default"
        },
    )
    lora_per_view: bool = field(
        default=False,
        metadata={"help": "one LoRA adapter per view (collab, content) instead of one shared adapter"},
    )
    embedding_init: EmbeddingInit = field(
        default="normal", metadata={"help": "ID-token init (semantic_sum needs index)"}
    )
    code_init: CodeInit = field(
        default="normal",
        metadata={
            "help": "semantic-ID token init: title_mean starts each code at the mean title embedding of "
            "the items holding it at its level (needs index)"
        },
    )
    embedding_init_std: float | None = field(
        default=None, metadata={"help": "std for normal init (default: the word embeddings' std)"}
    )
    mutual_reg: float = field(
        default=1.0, metadata={"help": "lambda of the mutual regulariser; 0 turns it off"}
    )
    embedding_dropout: float = field(
        default=0.0,
        metadata={
            "help": "dropout on the ID-token embeddings fed to the LM while training (SASRec's regulariser "
            "on small catalogues)"
        },
    )
    head: Head = field(
        default="tied",
        metadata={
            "help": "item head: tied to the collaborative item embeddings, or untied (own weights + bias)"
        },
    )
    max_doc_tokens: int = field(
        default=512, metadata={"help": "longest document fed to the LM (prompt + main)"}
    )
    index: str | None = field(
        default=None,
        metadata={
            "help": "saved ItemIndex directory (recipes/index.py): adds semantic-ID tokens for the semantic task"
        },
    )
    history_pool: HistoryPool = field(
        default="none",
        metadata={
            "help": "bag-of-items path into the item head; mean: the last hidden state plus a learned "
            "scale times the RMS-normalised mean collaborative embedding of the history's items"
        },
    )
    semantic_history: SemanticHistory = field(
        default="codes",
        metadata={
            "help": "task semantic_sequence: a history item is written as its semantic-ID codes, or as "
            "codes_item (its codes, then its item token)"
        },
    )
    prior: Prior = field(
        default="none",
        metadata={
            "help": "collaborative prior blended into the item scores; ease: fitted on the training "
            "matrix by finetuning, carried with the model"
        },
    )
    prior_weight: float = field(
        default=0.0,
        metadata={
            "help": "initial weight of the z-scored prior against the z-scored LM scores (finetuning "
            "chooses it on valid after training; the item head keeps it with its weights)"
        },
    )

    user_table: UserTable = field(
        default="full",
        metadata={
            "help": "user rows; full: one per user; none: one shared row (the user is the history); hashed: "
            "user_buckets rows, user_hashes summed per user; lowrank: user_rank wide, projected"
        },
    )
    user_buckets: int = field(default=65536, metadata={"help": "rows of a hashed user table"})
    user_hashes: int = field(default=2, metadata={"help": "hash functions (rows summed) per user, hashed"})
    user_rank: int = field(default=32, metadata={"help": "row width of a low-rank user table"})
    sparse_updates: bool = field(
        default=False,
        metadata={
            "help": "sparse gradients for the user rows: a step updates only the rows of its batch (not "
            "under FSDP/DeepSpeed)"
        },
    )

    def __post_init__(self) -> None:
        require(self.lora_r >= 1, "lora_r", self.lora_r, "must be at least 1")
        require(
            self.user_table in USER_TABLES, "user_table", self.user_table, f"must be one of {USER_TABLES}"
        )
        require(self.user_buckets >= 1, "user_buckets", self.user_buckets, "must be at least 1")
        require(self.user_hashes >= 1, "user_hashes", self.user_hashes, "must be at least 1")
        require(self.user_rank >= 1, "user_rank", self.user_rank, "must be at least 1")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        require(
            0 <= self.embedding_dropout < 1, "embedding_dropout", self.embedding_dropout, "must be in [0, 1)"
        )
        require(self.mutual_reg >= 0, "mutual_reg", self.mutual_reg, "must be >= 0")
        require(self.max_doc_tokens >= 1, "max_doc_tokens", self.max_doc_tokens, "must be at least 1")
        require(
            self.semantic_history in SEMANTIC_HISTORIES,
            "semantic_history",
            self.semantic_history,
            f"must be one of {SEMANTIC_HISTORIES}",
        )
        require(
            self.history_pool in HISTORY_POOLS,
            "history_pool",
            self.history_pool,
            f"must be one of {HISTORY_POOLS}",
        )
        require(self.prior in PRIORS, "prior", self.prior, f"must be one of {PRIORS}")

    def lora_config(self) -> LoraConfig:
        from peft import LoraConfig  # imported on use: recipes parse configs before loading the stack

        targets: str | list[str] | None = None
        if self.lora_target_modules:
            targets = self.lora_target_modules
            if targets != "all-linear":
                targets = [name.strip() for name in targets.split(",") if name.strip()]
        return LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=targets
        )


@dataclass
class TrainConfig:
    section: ClassVar[str] = "train"  # its YAML section (llmrec.config)
    output_dir: str = field(
        default="runs/pretrain", metadata={"help": "run directory: checkpoints, metrics.jsonl, model/"}
    )
    seed: int = field(default=42, metadata={"help": "seeds weights init, shuffling, masking and dropout"})
    epochs: int = field(default=1, metadata={"help": "passes over the training examples"})
    max_steps: int = field(
        default=-1, metadata={"help": "stop after this many optimizer steps (-1: run all epochs)"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "global batch (split over processes) per micro-step"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the LoRA weights"})
    embedding_lr: float | None = field(
        default=None, metadata={"help": "learning rate of ID-token tables and head (default: lr)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (LoRA weights only)"})
    scheduler: str = field(
        default="cosine",
        metadata={"help": "a transformers scheduler name: linear, cosine, constant_with_warmup, ..."},
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    mixed_precision: MixedPrecision = field(default="no", metadata={"help": "autocast dtype"})
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every N optimizer steps (0: only at the end)"}
    )
    save_total_limit: int = field(default=2, metadata={"help": "complete checkpoints kept"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start afresh in an output_dir that holds a previous run (deletes its results)"},
    )
    log_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    tensorboard: bool = field(
        default=False, metadata={"help": "also log to TensorBoard in output_dir/tensorboard"}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers"})
    patience: int = field(
        default=0, metadata={"help": "stop after N evaluations without improvement (0: never)"}
    )

    def __post_init__(self) -> None:
        require_seed(self.seed)
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(
            self.embedding_lr is None or self.embedding_lr > 0,
            "embedding_lr",
            self.embedding_lr,
            "must be > 0",
        )
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be at least 1")
        require(
            self.epochs >= 1 or self.max_steps > 0,
            "epochs",
            self.epochs,
            "must be at least 1 (or set max_steps)",
        )
        require(
            self.max_steps == -1 or self.max_steps > 0,
            "max_steps",
            self.max_steps,
            "must be > 0, or -1 for all epochs",
        )
        require(0 <= self.warmup_ratio <= 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1]")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0")
        require(self.save_steps >= 0, "save_steps", self.save_steps, "must be >= 0")
        require(self.save_total_limit >= 1, "save_total_limit", self.save_total_limit, "must be at least 1")
        require(self.log_steps >= 1, "log_steps", self.log_steps, "must be at least 1")
        require(self.patience >= 0, "patience", self.patience, "must be >= 0")
        require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        require(
            self.mixed_precision in ("no", "bf16", "fp16"),
            "mixed_precision",
            self.mixed_precision,
            "must be no, bf16 or fp16",
        )


@dataclass
class EvalConfig:
    """How a recipe scores users on valid or test: finetune and align (validation after every epoch,
    selecting the best), evaluate and baselines."""

    section: ClassVar[str] = "eval"  # its YAML section (llmrec.config)

    batch_size: int = field(default=64, metadata={"help": "users per forward pass"})
    metric_for_best: str | None = field(
        default=None,
        metadata={
            "help": "valid metric that selects the best epoch (finetune, align; default: ndcg@10 on a "
            "leave-one-out bundle, else cllm4rec = recall@20 + recall@40 + ndcg@100)"
        },
    )
    beam: int = field(
        default=0,
        metadata={
            "help": "beam width of the constrained semantic-ID search (semantic tasks; evaluate --generate); "
            "0: the largest metric cut-off"
        },
    )

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        require(self.beam >= 0, "beam", self.beam, "must be >= 0")

    def metric(self, leave_one_out: bool) -> str:
        """The metric to select on: ``metric_for_best``, else the protocol's own."""
        return self.metric_for_best or ("ndcg@10" if leave_one_out else "cllm4rec")


# zero-shot LM scoring (llmrec.zeroshot): recipes/zeroshot.py
ZeroShotMethod = Literal["naive", "cached", "trie"]
ZEROSHOT_METHODS = get_args(ZeroShotMethod)
PromptStyle = Literal["completion", "chat"]
NORMALIZATIONS: tuple[str, ...] = ("sum", "mean", "calibrated")
EOS = "<eos>"  # item_suffix value meaning "the tokenizer's EOS / end-of-turn token"


@dataclass
class PromptConfig:
    """How a user's history becomes a prompt and how candidate titles are appended to it."""

    section: ClassVar[str] = "prompt"  # its YAML section (llmrec.config)

    style: PromptStyle = field(
        default="completion",
        metadata={"help": "completion: plain text, for base LMs; chat: the tokenizer's chat template"},
    )
    template: str = field(
        default="Movies like {history}, and",
        metadata={"help": "completion-style prompt; {history} is replaced by the joined history titles"},
    )
    instruction: str = field(
        default=(
            "I enjoyed these movies: {history}. Recommend one more movie I would like. "
            "Answer with its title only."
        ),
        metadata={"help": "chat-style user message; the candidate title is scored as the assistant reply"},
    )
    separator: str = field(default=", ", metadata={"help": "joins history titles"})
    item_prefix: str | None = field(
        default=None, metadata={"help": "text before each candidate title (default: ' ' completion, '' chat)"}
    )
    item_suffix: str | None = field(
        default=None,
        metadata={
            "help": f"text after each candidate title, or {EOS!r} (default: ',' completion, {EOS} chat)"
        },
    )
    max_history: int = field(default=20, metadata={"help": "most recent history items put in the prompt"})
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "prompt token budget (default: model context minus the longest candidate)"},
    )
    recent_first: bool = field(
        default=True, metadata={"help": "list the history most recent first (else chronologically)"}
    )
    neutral_history: str = field(
        default="other movies",
        metadata={
            "help": "what stands for the history in the neutral prompt of calibrated scores "
            "(the same template, user-independent)"
        },
    )

    def __post_init__(self) -> None:
        require(
            self.style in get_args(PromptStyle),
            "style",
            self.style,
            f"must be one of {get_args(PromptStyle)}",
        )
        require(self.max_history >= 1, "max_history", self.max_history, "must be at least 1")
        require(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
            "max_prompt_tokens",
            self.max_prompt_tokens,
            "must be at least 1",
        )
        if self.item_prefix is None:
            self.item_prefix = " " if self.style == "completion" else ""
        if self.item_suffix is None:
            self.item_suffix = "," if self.style == "completion" else EOS


# item indexers (llmrec.indexing): the ``indexer`` section of recipes/index.py
Resolve = Literal["sinkhorn", "extra_level", "none"]
RESOLVE_METHODS = get_args(Resolve)
IndexMethod = Literal["rqvae", "rqkmeans", "random", "sequential", "collaborative"]


@dataclass
class QuantizerConfig:
    """What residual quantizers share: their codebooks and how colliding code tuples are made unique
    (`llmrec.indexing.collisions`)."""

    levels: int = field(default=3, metadata={"help": "quantization levels"})
    codebook_size: int = field(default=256, metadata={"help": "codes per level"})
    resolve: Resolve = field(default="sinkhorn", metadata={"help": "how code collisions are resolved"})
    sinkhorn_epsilon: float = field(default=0.003, metadata={"help": "Sinkhorn entropy weight"})
    sinkhorn_iters: int = field(default=50, metadata={"help": "Sinkhorn iterations per round"})
    sinkhorn_rounds: int = field(default=20, metadata={"help": "Sinkhorn re-assignment rounds"})

    def __post_init__(self) -> None:
        require(self.resolve in RESOLVE_METHODS, "resolve", self.resolve, f"must be one of {RESOLVE_METHODS}")
        require(self.levels >= 1, "levels", self.levels, "must be >= 1")
        require(self.codebook_size >= 2, "codebook_size", self.codebook_size, "must be >= 2")


@dataclass
class RQVAEConfig(QuantizerConfig):
    """How the RQ-VAE is shaped and trained; the ``indexer`` section of ``recipes/index.py --method rqvae``."""

    section: ClassVar[str] = "indexer"  # its YAML section (llmrec.config)

    latent_dim: int = field(default=32, metadata={"help": "latent size"})
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128], metadata={"help": "MLP widths"})
    beta: float = field(default=0.25, metadata={"help": "commitment loss weight"})
    # On ML-100K quantized training after a pretrained autoencoder only moved the latents off their
    # k-means codes (MSE 0.00056 -> 0.00062 in 30 epochs): the default is autoencoder, residual
    # k-means, then a decoder fitted to the codes (MSE 0.00054, benchmarks/rqvae_ml100k.py)
    epochs: int = field(default=0, metadata={"help": "epochs of quantized (RQ-VAE) training"})
    batch_size: int = field(default=256, metadata={"help": "batch size"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    kmeans_init: bool = field(default=True, metadata={"help": "start the codebooks from k-means"})
    ae_epochs: int = field(
        default=270, metadata={"help": "epochs of plain autoencoder training before the codebooks start"}
    )
    decoder_epochs: int = field(
        default=30, metadata={"help": "epochs fitting only the decoder to the final quantized latents"}
    )
    warmup_epochs: int = field(default=10, metadata={"help": "epochs of linear lr warmup"})
    dead_code_every: int = field(default=10, metadata={"help": "epochs between dead-code re-inits (0: off)"})
    # a decaying lr lets re-seeded codes settle (quantized training: full utilisation in 300 epochs)
    cosine_lr: bool = field(default=True, metadata={"help": "cosine learning-rate decay to 0"})
    # CPU threads while training: the MLP's matrices are too small to gain from more, and on a loaded
    # machine extra threads wait for each other (1 thread: 0.11 s/step, 2: 0.82 s on the shared 2 cores)
    threads: int = field(default=1, metadata={"help": "CPU threads while training (0: leave torch's)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    device: str = field(default="cpu", metadata={"help": "device for the RQ-VAE (and the content encoder)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require_seed(self.seed)
        self.hidden_dims = [int(d) for d in self.hidden_dims]


@dataclass
class RQKMeansConfig(QuantizerConfig):
    """Residual k-means semantic IDs; the ``indexer`` section of ``recipes/index.py --method rqkmeans``."""

    section: ClassVar[str] = "indexer"  # its YAML section (llmrec.config)

    balanced: bool = field(
        default=False, metadata={"help": "size-constrained k-means: every code holds n/K items (+-1)"}
    )
    iters: int = field(default=50, metadata={"help": "k-means iterations per level"})
    seed: int = field(default=0, metadata={"help": "seed of the k-means++ seeding"})
    device: str = field(default="cpu", metadata={"help": "device for k-means (and the content encoder)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.iters >= 1, "iters", self.iters, "must be >= 1")
        require_seed(self.seed)


@dataclass
class NumberIndexConfig:
    """The ``indexer`` section of ``recipes/index.py --method random|sequential``."""

    section: ClassVar[str] = "indexer"  # its YAML section (llmrec.config)

    codebook_size: int = field(default=256, metadata={"help": "digits per position (the number base)"})
    seed: int = field(default=0, metadata={"help": "seed of the random permutation (random)"})

    def __post_init__(self) -> None:
        require(self.codebook_size >= 2, "codebook_size", self.codebook_size, "must be >= 2")
        require_seed(self.seed)


@dataclass
class CollaborativeIndexConfig:
    """The ``indexer`` section of ``recipes/index.py --method collaborative``."""

    section: ClassVar[str] = "indexer"  # its YAML section (llmrec.config)

    n_clusters: int = field(default=16, metadata={"help": "clusters per split"})
    max_leaf: int = field(default=16, metadata={"help": "largest cluster left unsplit"})
    seed: int = field(default=0, metadata={"help": "seed of the spectral embedding and k-means"})

    def __post_init__(self) -> None:
        require(self.n_clusters >= 2, "n_clusters", self.n_clusters, "must be >= 2")
        require(self.max_leaf >= 1, "max_leaf", self.max_leaf, "must be >= 1")
        require_seed(self.seed)


@dataclass
class PiecesConfig:
    vocab_size: int = 1024
    model_type: Literal["bpe", "unigram"] = (
        "bpe"  # or "unigram" (on ML-100K RQ-VAE codes unigram keeps single symbols only)
    )
    seed: int = 0


# the indexing methods and their config dataclass; llmrec.indexing.INDEXERS pairs each with its indexer
INDEX_CONFIGS: dict[IndexMethod, type] = {
    "rqvae": RQVAEConfig,
    "rqkmeans": RQKMeansConfig,
    "random": NumberIndexConfig,
    "sequential": NumberIndexConfig,
    "collaborative": CollaborativeIndexConfig,
}
