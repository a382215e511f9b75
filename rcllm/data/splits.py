"""Per-user time split for training and evaluation: each user's last item is the test target, the
one before it the validation target, everything earlier is training data."""

from __future__ import annotations

from dataclasses import dataclass

from rcllm.data.dataset import Dataset


@dataclass
class Split:
    train: dict[str, list[str]]  # user -> items oldest first, the last two left out
    validation: dict[str, str]  # user -> second-to-last item
    test: dict[str, str]  # user -> last item
    dropped_users: int  # users with fewer interactions than the split's minimum

    def test_history(self, user: str) -> list[str]:
        """What precedes the test target: the training items, then the validation target."""
        return self.train[user] + [self.validation[user]]


def time_split(dataset: Dataset, min_interactions: int = 3) -> Split:
    """Split every user with at least ``min_interactions`` items (3 at least: one to train on,
    one to validate, one to test); the others are counted in ``dropped_users``."""
    if min_interactions < 3:
        raise ValueError("min_interactions must be at least 3: one training item, one validation, one test")
    split = Split({}, {}, {}, 0)
    for user, seq in dataset.user_sequences().items():
        if len(seq) < min_interactions:
            split.dropped_users += 1
            continue
        split.train[user] = seq[:-2]
        split.validation[user] = seq[-2]
        split.test[user] = seq[-1]
    return split
