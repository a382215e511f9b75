"""Building a cache: item embeddings, clustering and placement on nodes."""

from rcllm.build.embed import Embedder, LLMEmbedder, SentenceEmbedder, get_embedder, minilm_path
from rcllm.build.placement import (
    Placement,
    add_node,
    assign_clusters,
    cooccurrence_locality,
    cooccurrence_matrix,
    default_n_clusters,
    hash_placement,
    intra_node_similarity,
    kmeans,
    load_placement,
    place_items,
    place_new,
    random_placement,
    save_placement,
    token_imbalance,
)

__all__ = [
    "Embedder", "LLMEmbedder", "Placement", "SentenceEmbedder", "add_node", "assign_clusters",
    "cooccurrence_locality", "cooccurrence_matrix", "default_n_clusters", "get_embedder",
    "hash_placement", "intra_node_similarity", "kmeans", "load_placement", "minilm_path",
    "place_items", "place_new", "random_placement", "save_placement", "token_imbalance",
]
