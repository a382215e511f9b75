"""Building a cache: item embeddings, clustering and placement on nodes."""

from rcllm.build.embed import Embedder, LLMEmbedder, SentenceEmbedder, get_embedder, minilm_path
from rcllm.build.placement import (
    add_node,
    assign_clusters,
    cooccurrence_locality,
    cooccurrence_matrix,
    default_n_clusters,
    hash_placement,
    intra_node_similarity,
    kmeans,
    place_items,
    place_new,
    random_placement,
)

__all__ = [
    "Embedder", "LLMEmbedder", "SentenceEmbedder", "add_node", "assign_clusters",
    "cooccurrence_locality", "cooccurrence_matrix", "default_n_clusters", "get_embedder",
    "hash_placement", "intra_node_similarity", "kmeans", "minilm_path", "place_items", "place_new",
    "random_placement",
]
