"""Training and validation examples from a per-user time split, encoded by the serving prompt code.

An example for user ``u`` at training position ``t``: the history is the ``H`` items before
``t``, the positive is item ``t``, the candidates are the positive plus ``C - 1`` negatives drawn
as eval draws them (popularity-weighted, here from training counts only, never an item the user
touched), in shuffled order. Validation asks for each user's second-to-last item after their
whole training sequence. Test targets and validation targets never enter a training example:
training positions lie inside ``Split.train`` and negatives avoid every item the user touched.

The stream is a pure function of ``(seed, step)``, so a resumed run draws exactly the examples an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rcllm.data.dataset import Dataset
from rcllm.data.splits import Split, time_split
from rcllm.engine.ranker import Ranker


@dataclass(frozen=True)
class Example:
    user: str
    history: tuple[str, ...]  # item ids, oldest first
    candidates: tuple[str, ...]  # item ids, prompt order
    positive: int  # slot of the positive among the candidates

    @property
    def target(self) -> str:
        return self.candidates[self.positive]


@dataclass
class EncodedPrompt:
    ids: torch.Tensor  # long [L]: the serving prompt's token ids
    layout: list[tuple[str, int]]  # (segment name, token count) in prompt order
    target: int  # the positive's slot: the label the answer should be
    n_candidates: int


class NegativeSampler:
    """Items drawn with weight ``count + 1`` (the eval's popularity sampling), skipping excluded ones."""

    def __init__(self, items: Iterable[str], counts: Mapping[str, int]):
        self.pool = sorted(items)
        self.cum_weights: list[int] = []
        total = 0
        for item in self.pool:
            total += counts.get(item, 0) + 1
            self.cum_weights.append(total)

    def sample(self, rng: random.Random, n: int, exclude: set[str]) -> list[str]:
        picked: list[str] = []
        while len(picked) < n:
            item = rng.choices(self.pool, cum_weights=self.cum_weights, k=1)[0]
            if item not in exclude and item not in picked:
                picked.append(item)
        return picked


def _recent(items: Sequence[str], end: int, history: int) -> tuple[str, ...]:
    return tuple(items[max(0, end - history) : end])


class ExampleStream:
    """Training examples drawn per step, and the fixed validation requests, of one dataset."""

    def __init__(self, dataset: Dataset, history: int, candidates: int, seed: int, val_users: int, recent: int = 0):
        if recent < 0:
            raise ValueError("recent must be >= 0 (0: every training position)")
        if candidates < 2:
            raise ValueError("at least 2 candidates are needed to rank")
        if history < 0:
            raise ValueError("history must be >= 0 items")
        self.history, self.candidates, self.seed, self.recent = history, candidates, seed, recent
        self.split: Split = time_split(dataset)
        split = self.split
        if not split.train:
            raise ValueError(
                f"{dataset.name}: no user has the 3 interactions a time split needs "
                f"(one to train on, one to validate, one to test); {split.dropped_users} users have fewer"
            )
        self.touched = {u: set(split.train[u]) | {split.validation[u], split.test[u]} for u in split.train}
        counts: Counter = Counter()
        for seq in split.train.values():
            counts.update(seq)
        self.popularity = counts  # training counts: no validation or test target is counted
        self.negatives = NegativeSampler(dataset.items, counts)
        n_items = len(self.negatives.pool)
        # users whose untouched items can fill a candidate list, as eval requires
        users = sorted(
            (u for u in split.train if n_items - len(self.touched[u]) >= candidates - 1), key=lambda u: (len(u), u)
        )
        self.positions = [(u, t) for u in users for t in range(1, len(split.train[u]))]
        # with ``recent`` K: a user drawn uniformly, then one of their K latest training positions
        self.recent_positions = [
            [(u, t) for t in range(max(1, len(split.train[u]) - recent), len(split.train[u]))] for u in users
        ] if recent else []  # fmt: skip
        if not self.positions:
            raise ValueError(
                f"{dataset.name}: no training example: every user needs at least 4 interactions (2 to train on, "
                f"1 to validate, 1 to test) and {candidates - 1} catalog items they never touched for negatives"
            )
        rng = random.Random(f"{seed}:validation")
        chosen = list(users)
        rng.shuffle(chosen)
        self.validation = [
            self._example(rng, u, split.train[u], len(split.train[u]), split.validation[u]) for u in chosen[:val_users]
        ]

    def _example(self, rng: random.Random, user: str, seq: Sequence[str], end: int, positive: str) -> Example:
        cands = self.negatives.sample(rng, self.candidates - 1, self.touched[user]) + [positive]
        rng.shuffle(cands)
        return Example(user, _recent(seq, end, self.history), tuple(cands), cands.index(positive))

    def batch(self, step: int, size: int) -> list[Example]:
        """The ``size`` training examples of ``step``, with fresh negatives: random (user, position)
        pairs, or with ``recent`` K a random user and one of their K latest training positions.

        Uniform pairs weight users by their interaction count and positions by nothing: a user
        with 500 ratings gives 50 times the examples of one with 10, most of them far from the
        end of their timeline. Evaluation asks for each user's latest item, once per user, and
        on ml-100k what predicts a latest item differs from what predicts an early one (the
        newest release year among the candidates picks the validation target in the top 10 of
        20 for 0.68 of users, and a uniformly drawn training target for 0.47, chance; with
        ``recent`` 10 for 0.58)."""
        rng = random.Random(f"{self.seed}:train:{step}")
        if self.recent:
            picks = [rng.choice(rng.choice(self.recent_positions)) for _ in range(size)]
        else:
            picks = rng.choices(self.positions, k=size)
        return [self._example(rng, u, self.split.train[u], t, self.split.train[u][t]) for u, t in picks]

    def sizes(self) -> dict[str, int]:
        return {
            "users": len(self.split.train),
            "dropped_users": self.split.dropped_users,
            "training_users": len({u for u, _ in self.positions}),
            "training_positions": len(self.positions),
            "validation_users": len(self.validation),
            "items": len(self.negatives.pool),
        }


class PromptEncoder:
    """Examples as the token ids and segment layout the serving ranker builds for them."""

    def __init__(self, ranker: Ranker, items: Mapping[str, Mapping]):
        self.ranker = ranker
        self.texts = {item_id: ranker.builder.item_text(item) for item_id, item in items.items()}

    def encode(self, example: Example) -> EncodedPrompt:
        segments, _ = self.ranker.segments(
            [self.texts[i] for i in example.history], [self.texts[i] for i in example.candidates]
        )
        return EncodedPrompt(
            ids=torch.cat([s.token_ids for s in segments]),
            layout=[(s.name, s.n_tokens) for s in segments],
            target=example.positive,
            n_candidates=len(example.candidates),
        )

    def texts_of(self, example: Example) -> tuple[list[str], list[str]]:
        return [self.texts[i] for i in example.history], [self.texts[i] for i in example.candidates]
