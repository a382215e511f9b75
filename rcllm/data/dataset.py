"""A dataset is a catalog of items plus timestamped user-item interactions."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class Dataset:
    name: str
    items: dict[str, dict]  # item id -> {"id", "title", "year"?, "categories"?, ...}
    interactions: list[tuple[str, str, float]]  # (user_id, item_id, timestamp)
    _by_user: dict[str, list[str]] | None = field(default=None, repr=False)

    def user_sequences(self) -> dict[str, list[str]]:
        """Each user's items in time order (ties keep file order)."""
        if self._by_user is None:
            rows: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
            for n, (user, item, ts) in enumerate(self.interactions):
                rows[user].append((ts, n, item))
            self._by_user = {u: [item for _, _, item in sorted(r)] for u, r in rows.items()}
        return self._by_user

    def popularity(self, exclude_last: int = 0) -> Counter:
        """Interaction counts per item, leaving out each user's last ``exclude_last`` items."""
        counts: Counter = Counter()
        for seq in self.user_sequences().values():
            counts.update(seq[: len(seq) - exclude_last] if exclude_last else seq)
        return counts
