"""The gate of ``rcllm check --sweep``: sample held-out requests, optionally fit label offsets on
other users' requests, sweep the policies (:func:`rcllm.eval.check.run_sweep`), choose one
(:func:`rcllm.eval.check.choose_policy`) and write it into the model's folder, where ``serve``,
``eval`` and ``demo`` find it.

A reuse policy may prefer some label positions as its top choice whatever the candidates are (a
bias plain prefill does not share); with ``offset_requests`` the gate first fits one offset per
label position for each policy (:func:`fit_label_offsets`) on the requests of users it will not
measure, and then measures the policies with their offsets choosing the first place
(:meth:`rcllm.engine.ranker.Ranker.order`), as they will be served.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rcllm.data.dataset import Dataset
from rcllm.data.sampling import DEFAULT_CANDIDATES, DEFAULT_HISTORY
from rcllm.engine.model_policy import OFFSETS_DECIDE, write_policy_file
from rcllm.engine.prompt import item_text
from rcllm.engine.ranker import Ranker, Ranking
from rcllm.eval.check import (
    DEFAULT_SWEEP,
    Choice,
    PromptCase,
    SweepResult,
    Thresholds,
    blind_message,
    choose_policy,
    run_sweep,
    sample_cases,
)


# --- label offsets: a reuse policy's own preference for some label positions ----------------


def fit_label_offsets(target: torch.Tensor, scores: torch.Tensor, steps: int = 500, lr: float = 0.02) -> torch.Tensor:
    """One offset per label position [n] that brings the label distributions ``softmax(scores +
    offsets)`` closest (mean KL) to ``target``'s; both are log-scores [requests, n] (a plain
    prefill's and a policy's). Centred, since a common shift changes no distribution."""
    if target.shape != scores.shape or target.dim() != 2 or not len(target):
        raise ValueError(f"log-scores of equal shape [requests, labels] expected, got {tuple(target.shape)} and "
                         f"{tuple(scores.shape)}")  # fmt: skip
    target = torch.log_softmax(target.float(), -1)
    scores = scores.float()
    offsets = torch.zeros(scores.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([offsets], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.kl_div(torch.log_softmax(scores + offsets, -1), target, log_target=True, reduction="batchmean").backward()
            optimizer.step()
    offsets = offsets.detach()
    return offsets - offsets.mean()


def log_scores(rankings: Sequence[Ranking]) -> torch.Tensor:
    """The rankings' calibrated label log-scores [requests, labels]."""
    return torch.tensor([r.scores for r in rankings], dtype=torch.float64).clamp(min=1e-30).log().float()


@dataclass
class OffsetFit:
    requests: int  # the requests the offsets were fitted on (users the gate does not measure)
    candidates: int  # the prompt size the offsets are for
    offsets: dict[str, list[float]]  # per reuse policy, one per label position
    top1_before: dict[str, float]  # per policy: top-1 agreement with full prefill on the fit requests, without
    top1_after: dict[str, float]  # and with its offsets

    def to_json(self) -> dict:
        return {"requests": self.requests, "candidates": self.candidates, "decides": OFFSETS_DECIDE,
                "policies": self.offsets,
                "fit_top1": {p: [self.top1_before[p], self.top1_after[p]] for p in self.offsets}}  # fmt: skip


def offset_cases(
    dataset: Dataset, settings: "GateSettings", gate: Sequence[PromptCase], text: Callable[[Mapping], str] = item_text
) -> list[PromptCase]:
    """Requests for fitting offsets: those of the ``settings.offset_requests`` users that follow
    the gate's in its seeded order, so that no user is in both."""
    every = sample_cases(dataset, settings.prompts + settings.offset_requests, settings.history, settings.candidates,
                         settings.seed, text=text)  # fmt: skip
    if every[: len(gate)] != list(gate):
        raise RuntimeError("the gate's requests are not the first of the longer sample: sampling is not prefix-stable")
    rest = every[len(gate):]
    if not rest:
        raise ValueError(
            f"{dataset.name}: no user is left for fitting label offsets after the gate's {len(gate)} requests; "
            "lower --prompts or leave --fit-offsets at 0"
        )
    return rest


def fit_gate_offsets(
    ranker: Ranker, cases: Sequence[PromptCase], policies: Sequence[str], seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> OffsetFit:
    """Rank ``cases`` under full prefill and each policy (without offsets), fit each policy's
    label offsets to full prefill's distributions, and install them in ``ranker``, where they
    choose the policy's first place. ``top1_after``: agreement on these requests with them."""
    sizes = {len(c.candidates) for c in cases}
    if len(sizes) != 1:
        raise ValueError(f"label offsets are fitted for one prompt size; these requests have {sorted(sizes)} candidates")
    ranker.label_offsets.clear()
    sweep = run_sweep(ranker, cases, policies, seed=seed, progress=progress, probe=False)
    full = sweep.rankings["full"]
    target = log_scores(full)
    fitted, before, after = {}, {}, {}
    for name, rankings in sweep.rankings.items():
        if name == "full":
            continue
        scores = log_scores(rankings)
        offsets = fit_label_offsets(target, scores)
        fitted[name] = [round(x, 5) for x in offsets.tolist()]
        before[name] = (target.argmax(-1) == scores.argmax(-1)).float().mean().item()
        after[name] = (target.argmax(-1) == (scores + torch.tensor(fitted[name])).argmax(-1)).float().mean().item()
        ranker.label_offsets[name] = torch.tensor(fitted[name])
    return OffsetFit(len(cases), sizes.pop(), fitted, before, after)


# --- the gate: sweep, decide, write the model's policy file ---------------------------------


@dataclass
class GateSettings:
    dataset: str  # the dataset's name, for the record
    prompts: int = 20
    history: int = DEFAULT_HISTORY
    candidates: int = DEFAULT_CANDIDATES
    seed: int = 0
    policies: tuple[str, ...] = DEFAULT_SWEEP
    thresholds: Thresholds = field(default_factory=Thresholds)
    offset_requests: int = 0  # requests (of other users) to fit label offsets on first; 0: no offsets


@dataclass
class GateOutcome:
    sweep: SweepResult
    choice: Choice
    refusal: str | None  # why no policy was written (content-blind, none passed); None when one was
    written: Path | None  # the policy file, when a policy was chosen
    offsets: OffsetFit | None = None  # the label offsets the policies were measured with, when fitted

    @property
    def passed(self) -> bool:
        return self.refusal is None


def policy_record(
    sweep: SweepResult, choice: Choice, settings: GateSettings, model: str, fingerprint: str,
    offsets: OffsetFit | None = None,
) -> dict:
    """What the model's policy file holds: the choice, and everything needed to judge it."""
    if choice.chosen is None:
        raise ValueError("no policy was chosen, so there is nothing to record")
    record = {
        "policy": choice.chosen.policy,
        "model": model,
        "fingerprint": fingerprint,
        "dataset": settings.dataset,
        "requests": sweep.prompts,
        "history": settings.history,
        "candidates": sweep.candidates,
        "seed": settings.seed,
        "calibration": sweep.calibration,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "thresholds": {**asdict(settings.thresholds), "headline": sweep.headline},
        "content_probe": {"top1_item_stable": sweep.top1_item_stable, "top1_label_stable": sweep.top1_label_stable},
        "frontier": [asdict(r) for r in sweep.rows],
    }
    if offsets is not None:
        record["label_offsets"] = offsets.to_json()
    return record


def run_gate(
    ranker: Ranker,
    dataset: Dataset,
    settings: GateSettings,
    model: str,
    folder: Path,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> GateOutcome:
    """Sweep ``settings.policies`` on held-out requests of ``dataset`` and, unless the model is
    content-blind or no cheap policy meets the thresholds, write the choice into ``folder``.

    The policies are measured as the written file will serve them: with label offsets fitted
    first on ``settings.offset_requests`` requests of other users, or with none (offsets the
    ranker had from an earlier file are dropped). ``stage`` hears each phase's name."""
    if settings.offset_requests < 0:
        raise ValueError("offset_requests must be >= 0")
    text = ranker.builder.item_text
    cases = sample_cases(dataset, settings.prompts, settings.history, settings.candidates, settings.seed, text=text)
    ranker.label_offsets.clear()
    offsets = None
    if settings.offset_requests:
        fit_cases = offset_cases(dataset, settings, cases, text)
        if stage:
            stage(f"fitting label offsets on {len(fit_cases)} requests of other users")
        offsets = fit_gate_offsets(ranker, fit_cases, settings.policies, seed=settings.seed, progress=progress)
    if stage:
        stage(f"sweeping {len(settings.policies)} policies + full on {len(cases)} requests")
    sweep = run_sweep(ranker, cases, settings.policies, seed=settings.seed, progress=progress)
    choice = choose_policy(sweep.rows, settings.thresholds, sweep.headline)
    if sweep.content_blind:
        return GateOutcome(sweep, choice, blind_message(sweep.top1_label_stable, sweep.top1_item_stable), None, offsets)
    if choice.chosen is None:
        closest = choice.closest
        refusal = "no policy other than full meets the thresholds" + (
            f"; the closest, {closest.policy}, missed by {'; '.join(choice.shortfall)}" if closest else ""
        )
        return GateOutcome(sweep, choice, refusal, None, offsets)
    record = policy_record(sweep, choice, settings, model, ranker.engine.lm.fingerprint, offsets)
    return GateOutcome(sweep, choice, None, write_policy_file(folder, record), offsets)
