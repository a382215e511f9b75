"""Names of the files a cache folder holds beside the node stores, the manifest and the placement.

Build writes these files; serving and eval read them. The names live here, below all three.
"""

CATALOG_COPY = "catalog.jsonl"  # the items as built: nodes render candidate texts from it
HISTORIES_COPY = "histories.jsonl"  # under users/: a request may omit a known user's history
ITEM_IDS = "items.json"  # under placement/: row i of the placement arrays is this item id
ITEM_KEYS = "keys.json"  # under placement/: the block key of row i (moving blocks needs no model)
EMBEDDINGS = "embeddings.npy"
