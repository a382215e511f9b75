"""Ranking prompts as blocks: one place builds them for serving, eval, check and fine-tuning.

``[system][history][item_1][label_1] ... [item_n][label_n][instruction]``: each segment is
tokenized on its own and the prompt's ids are their concatenation, so every system (plain
prefill, prefix cache, block reuse) runs on exactly the same ids. Item blocks hold only the
item's text (``\n- {text} ->``); the label that ties an item to its slot is a fresh one-token
segment (`` A``), so one cached item block serves every position and label.

The label comes *after* its item. Under reuse a cached item block never saw its label, and a
fresh token sees only what precedes it: a label placed before its item could read only the
previous item, never the one it names. After the item, the label token (always recomputed)
attends to the item's cached KV and carries its content under its letter, which the answer then
copies (the label token is the answer token).

Optional *link* tokens (``link_tokens`` copies of one fixed token between an item and its label,
fresh like the label) give each candidate a few more recomputed tokens that read both the user's
history and the item's cached KV: under reuse without correction they are where a model trained
for reuse (``rcllm finetune --link-tokens``) compares the two. A model folder records the
template it was trained with (:data:`TEMPLATE_FILE`), and :func:`model_template` reads it back.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LABELS = string.ascii_uppercase
TEMPLATE_FILE = "rcllm-template.json"  # in a model folder: the prompt template the model was trained with


MATCH_WORDS = (" yes", " no")


@dataclass(frozen=True)
class PromptTemplate:
    system: str = (
        "You are a recommender system. Read the items a user chose, in order, and a list of "
        "lettered candidates, then answer with the letter of the candidate the user will choose next.\n\n"
    )
    history_header: str = "The user chose, oldest first:\n"
    history_line: str = "- {text}\n"
    history_empty: str = "The user has no history yet.\n"
    candidates_header: str = "\nCandidates:"
    item: str = "\n- {text} ->"
    label: str = " {label}"
    link: str = " ~"  # the link token's text (one token), repeated link_tokens times after each item
    link_tokens: int = 0
    categories_last: bool = False  # item text: title; description; categories (the tail tokens name the categories)
    instruction: str = "\n\nWhich candidate will the user choose next? Answer with its letter.\nAnswer:"
    content_free: str = "N/A"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "PromptTemplate":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown prompt template fields: {sorted(unknown)}")
        return cls(**data)


def model_template(model_path: str | Path) -> PromptTemplate | None:
    """The template recorded in a model folder by ``rcllm finetune``, or None (a folder without
    one, a hub id): such a model takes the default template."""
    path = Path(model_path) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return PromptTemplate.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a prompt template ({e}); delete it to use the default template") from e


def item_text(item: Mapping, max_chars: int = 300, categories_last: bool = False) -> str:
    """The text of an item block: title, year, categories and a short description; with
    ``categories_last``, the categories after the description, so that an item block ends with
    them and a policy that recomputes each block's last tokens (``tail:K``) recomputes them."""
    title = str(item["title"]).strip()
    parts = [title]
    year = item.get("year")
    if year not in (None, "") and str(year) not in title:
        parts[0] = f"{title} ({year})"
    categories = item.get("categories") or []
    if categories:
        parts.append(", ".join(str(c) for c in categories))
    description = item.get("text") or item.get("description")
    if description:
        description = " ".join(str(description).split())
        description = description[:max_chars].rstrip() + ("..." if len(description) > max_chars else "")
        parts.insert(1 if categories_last and categories else len(parts), description)
    return "; ".join(parts)


class PromptBuilder:
    """Token ids of each segment of a ranking prompt, for one tokenizer and template."""

    def __init__(self, tokenizer, template: PromptTemplate | None = None):
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        self._system = torch.tensor(self._encode(self.template.system, special=True))
        self._instruction = torch.tensor(self._encode(self.template.instruction))
        self._labels = [torch.tensor(self._encode(self.template.label.format(label=c))) for c in LABELS]
        self.label_token_ids = self._answer_tokens()
        self._link = torch.tensor(self._link_tokens(), dtype=torch.long)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _answer_tokens(self) -> list[int]:
        """The single token each label is answered with, right after the instruction."""
        base = self._encode(self.template.instruction)
        ids = []
        for c in LABELS:
            full = self._encode(self.template.instruction + " " + c)
            if full[: len(base)] != base or len(full) != len(base) + 1:
                raise ValueError(
                    f"this tokenizer does not answer label {c!r} with a single token after the instruction; "
                    "ranking reads one token per label"
                )
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise ValueError("two labels share an answer token in this tokenizer")
        return ids

    def _link_tokens(self) -> list[int]:
        n = self.template.link_tokens
        if n < 0:
            raise ValueError(f"link_tokens {n}: the number of link tokens after each item is >= 0")
        ids = self._encode(self.template.link * n)
        if len(ids) != n:
            raise ValueError(
                f"link {self.template.link!r} x {n} is {len(ids)} tokens in this tokenizer, not {n}: "
                "pick a link text that is one token however often it repeats"
            )
        return ids

    def match_token_ids(self) -> tuple[int, int]:
        """The tokens (`` yes``, `` no``) whose logit difference at a label token scores its item
        as a match for the history (what ``rcllm finetune --match-weight`` trains)."""
        ids = [self._encode(word) for word in MATCH_WORDS]
        if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"this tokenizer does not spell {MATCH_WORDS} as two distinct single tokens")
        return ids[0][0], ids[1][0]

    def link_ids(self) -> torch.Tensor:
        """The fresh link tokens that follow every item block (empty without link tokens)."""
        return self._link

    @property
    def max_candidates(self) -> int:
        return len(LABELS)

    def system_ids(self) -> torch.Tensor:
        return self._system

    def instruction_ids(self) -> torch.Tensor:
        return self._instruction

    def label_ids(self, slot: int) -> torch.Tensor:
        if not 0 <= slot < len(LABELS):
            raise ValueError(f"slot {slot} has no label: at most {len(LABELS)} candidates per prompt")
        return self._labels[slot]

    def history_ids(self, history: Sequence[str]) -> torch.Tensor:
        t = self.template
        body = "".join(t.history_line.format(text=h) for h in history) if history else ""
        text = (t.history_header + body if history else t.history_empty) + t.candidates_header
        return torch.tensor(self._encode(text))

    def item_text(self, item: Mapping) -> str:
        """An item's text in this template's field order (:func:`item_text`)."""
        return item_text(item, categories_last=self.template.categories_last)

    def item_ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self._encode(self.template.item.format(text=text)))
