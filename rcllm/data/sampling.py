"""Leave-one-out ranking requests: history, the positive, and sampled negatives."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rcllm.data.dataset import Dataset

# A request's most recent history items and its candidates (the positive among them), the
# defaults of every command and settings class that samples requests or builds history blocks.
DEFAULT_HISTORY = 20
DEFAULT_CANDIDATES = 20


@dataclass
class RankingRequest:
    user_id: str
    history: list[str]  # item ids, oldest first
    candidates: list[str]  # item ids, in prompt order
    positive: str


def sample_requests(
    dataset: Dataset,
    n_users: int,
    history: int = DEFAULT_HISTORY,
    candidates: int = DEFAULT_CANDIDATES,
    negatives: str = "popularity",
    seed: int = 0,
    requests_per_user: int = 1,
) -> list[RankingRequest]:
    """``requests_per_user`` requests per sampled user: the last item is the positive, the
    ``history`` items before it the history, plus ``candidates - 1`` negatives the user never
    interacted with (popularity-weighted by default, from counts that exclude every user's last
    item), shuffled with the positive. Each request draws fresh negatives; with several per user,
    all requests come in one seeded interleaved order, so returning users recur the way they do
    in production. Users with too few unseen items for the negatives are skipped."""
    if negatives not in ("popularity", "uniform"):
        raise ValueError(f"unknown negative sampling {negatives!r}; expected popularity or uniform")
    if candidates < 2:
        raise ValueError("at least 2 candidates are needed to rank")
    if requests_per_user < 1:
        raise ValueError("requests_per_user must be at least 1")
    rng = random.Random(seed)
    sequences = dataset.user_sequences()
    users = sorted((u for u, s in sequences.items() if len(s) >= 2), key=lambda u: (len(u), u))
    if not users:
        raise ValueError(f"{dataset.name}: no user has the 2 interactions a leave-one-out request needs")
    rng.shuffle(users)
    pool = sorted(dataset.items)
    popularity = dataset.popularity(exclude_last=1)
    cum_weights = None
    if negatives == "popularity":
        cum_weights, total = [], 0
        for item in pool:
            total += popularity.get(item, 0) + 1
            cum_weights.append(total)
    requests = []
    for user in users[:n_users]:
        seq = sequences[user]
        seen = set(seq)
        if len(pool) - len(seen) < candidates - 1:
            continue
        for _ in range(requests_per_user):
            negs: list[str] = []
            while len(negs) < candidates - 1:
                pick = rng.choices(pool, cum_weights=cum_weights, k=1)[0]
                if pick not in seen and pick not in negs:
                    negs.append(pick)
            cands = negs + [seq[-1]]
            rng.shuffle(cands)
            requests.append(RankingRequest(user, seq[-1 - history : -1], cands, seq[-1]))
    if requests_per_user > 1:
        # one request per user is already in a seeded random user order (and stays the stream
        # it always was); several are spread out so that a user's requests don't come in a row
        rng.shuffle(requests)
    return requests
