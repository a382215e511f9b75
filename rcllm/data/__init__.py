"""Datasets in rcllm's formats: items, interactions, and ranking requests drawn from them.

- ``catalog``: ``catalog.jsonl`` (the items the build caches), validated line by line
- ``formats``: ``interactions.jsonl`` and ``histories.jsonl`` (the build's ``--users`` file)
- ``movielens``, ``synthetic``: the datasets rcllm knows by name; ``loaders``: by name or folder,
  and ``prepare`` (``rcllm data prepare``)
- ``splits``: per-user time split for training; ``sampling``: leave-one-out ranking requests
- ``jsonl``: line-numbered error collection and atomic writes shared by the formats
- ``metrics``: ranking quality and fidelity, plain functions (eval, train and the demo score with them)
"""
