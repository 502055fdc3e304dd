"""Source-free generation: a diffusion model over c_GLB (RCG-style), trained on `dinodiff cache` output."""

from dinodiff.embeddings.data import CachedEmbeddings, read_cached_embeddings
from dinodiff.embeddings.metrics import (
                                          embedding_report,
                                          frechet_distance,
                                          precision_recall,
)
from dinodiff.embeddings.model_io import (
                                          EmbeddingModel,
                                          load_embedding_model,
                                          resolve_embedding_folder,
                                          sample_embeddings,
                                          save_embedding_model,
)
from dinodiff.embeddings.train import EmbeddingTrainSettings, train_embeddings

__all__ = [
    "CachedEmbeddings", "EmbeddingModel", "EmbeddingTrainSettings", "embedding_report",
    "frechet_distance", "load_embedding_model", "precision_recall", "read_cached_embeddings",
    "resolve_embedding_folder", "sample_embeddings", "save_embedding_model", "train_embeddings",
]
