"""Source-free generation: a diffusion model over c_GLB (RCG-style), trained on `dinodiff cache` output.

The package's API is imported when first used (PEP 562), so the CLI reads EmbeddingTrainSettings at start-up
without torch.
"""

from typing import Any

from dinodiff.embeddings.settings import EmbeddingTrainSettings

__all__ = [
    "CachedEmbeddings", "EmbeddingModel", "EmbeddingTrainSettings", "embedding_report",
    "frechet_distance", "load_embedding_model", "precision_recall", "read_cached_embeddings",
    "resolve_embedding_folder", "sample_embeddings", "save_embedding_model", "train_embeddings",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # the API's homes; plain imports (`from dinodiff.embeddings import data` would ask this function again)
    import dinodiff.embeddings.data
    import dinodiff.embeddings.metrics
    import dinodiff.embeddings.model_io
    import dinodiff.embeddings.train

    package = dinodiff.embeddings
    homes = (package.data, package.metrics, package.model_io, package.train)
    return getattr(next(module for module in homes if hasattr(module, name)), name)
