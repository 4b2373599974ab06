"""Top-K recommendations with titles from an exported bundle.

python recipes/recommend.py --bundle bundles/ml-100k --user 196 -k 10
python recipes/recommend.py --bundle bundles/ml-100k --history 50,181,100 -k 10   # a user unseen in training
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import ConfigError, parse_config, require

if TYPE_CHECKING:
    from llmrec.recommender import Recommendation


@dataclass
class RecommendArgs:
    section: ClassVar[str] = "recommend"  # its YAML section (llmrec.config)
    bundle: str = field(default="runs/export", metadata={"help": "bundle written by recipes/export.py"})
    user: str | None = field(default=None, metadata={"help": "raw id of a user seen in training"})
    history: str | None = field(
        default=None, metadata={"help": "comma-separated raw item ids of a user unseen in training"}
    )
    k: int = field(default=10, metadata={"aliases": ["-k"], "help": "number of items"})
    exclude_seen: bool = field(default=True, metadata={"help": "leave out the items the user already has"})
    verify: bool = field(
        default=True,
        metadata={"help": "check every bundle file's sha256 (--no_verify: sizes only, for huge bundles)"},
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)"}
    )

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", self.k, "must be at least 1")


# what this recipe parses; the first is its own YAML section
CONFIGS = (RecommendArgs,)


def format_list(title: str, items: list[Recommendation]) -> str:
    lines = [title, f"{'rank':>4}  {'item':<10} {'score':>9}  title"]
    lines += [f"{rank:>4}  {r.item:<10} {r.score:>9.4f}  {r.title}" for rank, r in enumerate(items, 1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Recommendation]:
    setup_logging()
    (args,) = parse_config(*CONFIGS, args=argv)
    if (args.user is None) == (args.history is None):
        raise ConfigError("give exactly one of --user ID or --history ID,ID,...")
    from llmrec.recommender import Recommender  # the model stack loads after parsing: --help answers at once

    recommender = Recommender.from_pretrained(args.bundle, device=args.device, verify=args.verify)
    if args.user is not None:
        items = recommender.recommend(args.user, k=args.k, exclude_seen=args.exclude_seen)
        seen = len(recommender.history(args.user))
        title = f"Top {args.k} for user {args.user} ({seen} training items)"
    else:
        history = [item.strip() for item in args.history.split(",") if item.strip()]
        items = recommender.recommend(history=history, k=args.k, exclude_seen=args.exclude_seen)
        title = f"Top {args.k} for a new user with {len(history)} items (cold prompt)"
    print(format_list(title, items))
    return items


if __name__ == "__main__":
    sys.exit(run_cli(main))
