"""The names the data modules share: the label that means "no loss" and the data configuration.

    from herd.data.types import IGNORE_INDEX, DataConfig

IGNORE_INDEX (-100) marks a position without loss in `labels` (the value torch's cross entropy
ignores by default and Hugging Face uses): padding, the target after <|end_of_text|>, image-layout
tokens, and (in post-training) prompt tokens. DataConfig says what herd.data.loader loads and how
it packs it; herd.data.packing, herd.data.multimodal and the trainer read it from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

IGNORE_INDEX = -100

# digits are short documents (~17 tokens): 0.3 of the tokens is ~36 captioned images per 8×256 batch
DEFAULT_WEIGHTS = {"shakespeare": 0.2, "bible": 0.15, "python": 0.25, "docs": 0.1, "digits": 0.3}


@dataclass
class DataConfig:
    """What to load and how to pack it. `weights` are shares of tokens per source."""

    seq_len: int = 256
    batch_size: int = 8  # global rows per step (all ranks together)
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    val_fraction: float = 0.05  # of each source's documents, by a stable hash
    seed: int = 0  # order of the training stream
    cache_dir: str | None = None  # None: $HERD_DATA_CACHE or ~/.cache/herd/data
    max_images_per_sequence: int = 8
    val_batches: int = 16
    max_docs: int | None = None  # per source: only its first max_docs documents (tests, quick runs)
    digit_sources: tuple = ("mnist", "sklearn")
    progress: bool | None = None  # tqdm while tokenising (None: on a terminal only)

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        from herd.data.sources import TEXT_SOURCES

        known = [*TEXT_SOURCES, "digits"]
        bad = [k for k in self.weights if k not in known]
        if bad:
            raise ValueError(f"unknown data sources {bad}; choose from {', '.join(known)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {self.weights}")
        self.digit_sources = tuple(self.digit_sources)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["digit_sources"] = list(self.digit_sources)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
