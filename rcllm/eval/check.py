"""The per-model correctness gate (``rcllm check``): how faithful reuse is to a plain prefill.

Two modes. :func:`run_check` measures one policy on ranking prompts: logits, top-1 agreement,
Kendall tau and KL against full prefill. :func:`run_sweep` measures a grid of policies on held-out
leave-one-out requests: each one's quality (HR against the held-out item), fidelity and CPU time,
and the Pareto front; :func:`choose_policy` picks the cheapest that meets the thresholds, and
:func:`rcllm.eval.gate.run_gate` writes that choice into the model's folder, where ``serve``,
``eval`` and ``demo`` find it.

Agreement alone proves nothing on a model that ignores the candidates (one that always answers
``A`` agrees with itself whatever the cache does), so both modes also measure whether the model's
ranking depends on the candidates at all: after rotating the candidates (every item moves to
another slot), does the same *item* stay on top (content-aware) or the same *label*
(content-blind)? Neither mode calls a content-blind model faithful.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from rcllm.data.dataset import Dataset
from rcllm.data.metrics import headline_hit_rate, kendall_tau, kl_divergence, mean_half_width, rank_of
from rcllm.data.sampling import sample_requests
from rcllm.engine.blocks import uncached
from rcllm.engine.policy import parse_policy
from rcllm.engine.prompt import item_text
from rcllm.engine.ranker import MemoryBlockCache, Ranker, Ranking
from rcllm.eval.runner import fidelity

# The grid of `rcllm check --sweep`, cheapest first; `full` is always measured as the reference.
DEFAULT_SWEEP = (
    "none", "boundary:1", "boundary:2", "boundary:4", "boundary:8", "tail:2", "tail:4", "deviation:0.15", "deviation:0.3",
    "deviation:0.5",
)


@dataclass
class PromptCase:
    history: list[str]  # item texts, oldest first
    candidates: list[str]  # item texts, prompt order
    positive: int | None = None  # slot of the held-out item among the candidates, when known


def sample_cases(
    dataset: Dataset, n_prompts: int, history: int, candidates: int, seed: int, negatives: str = "popularity",
    text: Callable[[Mapping], str] = item_text,
) -> list[PromptCase]:
    """Ranking prompts drawn from a dataset's leave-one-out requests, as item texts (``text``:
    the ranker's, ``ranker.builder.item_text``), with the held-out item's slot."""
    requests = sample_requests(
        dataset, n_prompts, history=history, candidates=candidates, negatives=negatives, seed=seed
    )
    if not requests:
        raise ValueError(f"{dataset.name}: no user qualifies for a leave-one-out request")
    texts = {i: text(item) for i, item in dataset.items.items()}
    return [
        PromptCase([texts[i] for i in r.history], [texts[i] for i in r.candidates], r.candidates.index(r.positive))
        for r in requests
    ]


# --- content-blindness ---------------------------------------------------------------------


def rotation(n: int, rng: random.Random) -> list[int]:
    """A cyclic shift by 1..n-1 slots: new slot j holds old candidate perm[j], and no candidate
    keeps its slot, so "the same item on top" and "the same label on top" exclude each other."""
    shift = rng.randrange(1, n) if n > 1 else 0
    return [(j + shift) % n for j in range(n)]


def top_after_rotation(ranker: Ranker, case: PromptCase, best: int, rng: random.Random) -> tuple[bool, bool]:
    """Rank ``case`` again with its candidates rotated (full prefill): did the item ``best``
    (its slot before) stay on top, and did the label of slot ``best``?"""
    perm = rotation(len(case.candidates), rng)
    again = ranker.rank(case.history, [case.candidates[i] for i in perm], "full")
    slot = again.order[0]
    return perm[slot] == best, slot == best


# --- one policy ----------------------------------------------------------------------------


@dataclass
class CheckReport:
    model: str
    policy: str
    prompts: int
    max_abs_logit_diff: float  # the policy's next-token logits vs full prefill, worst prompt
    top1_agree: float
    kendall_tau: float
    kl: float
    full_vs_stock_max_abs_logit_diff: float  # our full prefill vs the stock transformers forward
    top1_item_stable: float  # share of prompts whose best item stays on top after rotating the candidates
    top1_label_stable: float  # share whose best *label* stays on top instead (high = content-blind)
    label_bias: float  # share of prompts whose uncalibrated answer is the most frequent label
    recomputed_fraction: float
    calibration: str
    content_blind: bool
    failures: list[str] = field(default_factory=list)
    label_offsets: bool = False  # the policy's label offsets (from the gate) were applied to some prompts

    def to_json(self) -> dict:
        return asdict(self)


def run_check(
    ranker: Ranker,
    cases: Sequence[PromptCase],
    policy: str,
    model_name: str,
    seed: int = 0,
    min_top1: float = 0.9,
    min_tau: float = 0.9,
    max_kl: float = 0.05,
    max_full_diff: float = 1e-3,
) -> CheckReport:
    """Every prompt both ways: plain prefill, and ``policy`` with the history and all item blocks
    cached. A policy other than ``full`` fails on a content-blind model whatever it agrees with."""
    if not cases:
        raise ValueError("no sample prompts to check")
    policy = parse_policy(policy)
    engine = ranker.engine
    source = MemoryBlockCache(engine, ranker.builder)
    rng = random.Random(seed)
    diffs, stock_diffs, top1, taus, kls, fractions = [], [], [], [], [], []
    item_stable = label_stable = 0
    raw_answers: Counter = Counter()
    for case in cases:
        n = len(case.candidates)
        cached, _ = ranker.segments(case.history, case.candidates, source)
        plain = uncached(cached)
        full = engine.forward(plain, "full")
        ids = torch.cat([s.token_ids for s in plain])[None].to(engine.device)
        with torch.inference_mode():
            stock = engine.lm.model(input_ids=ids).logits[0, -1].float().cpu()
        stock_diffs.append(float((full.logits - stock).abs().max()))
        reused = engine.forward(cached, policy)
        fractions.append(reused.recomputed_fraction)
        diffs.append(float((reused.logits - full.logits).abs().max()))
        raw_full, cal_full = ranker.label_scores(full.logits, n)
        _, cal_reused = ranker.label_scores(reused.logits, n)
        top1.append(int(cal_full.argmax()) == ranker.order(cal_reused, str(policy))[0])
        taus.append(kendall_tau(cal_full.tolist(), cal_reused.tolist()))
        kls.append(kl_divergence(cal_full.tolist(), cal_reused.tolist()))
        raw_answers[int(raw_full.argmax())] += 1
        item_kept, label_kept = top_after_rotation(ranker, case, int(cal_full.argmax()), rng)
        item_stable += item_kept
        label_stable += label_kept

    count = len(cases)
    report = CheckReport(
        model=model_name,
        policy=str(policy),
        prompts=count,
        max_abs_logit_diff=max(diffs),
        top1_agree=sum(top1) / count,
        kendall_tau=sum(taus) / count,
        kl=sum(kls) / count,
        full_vs_stock_max_abs_logit_diff=max(stock_diffs),
        top1_item_stable=item_stable / count,
        top1_label_stable=label_stable / count,
        label_bias=raw_answers.most_common(1)[0][1] / count,
        recomputed_fraction=sum(fractions) / count,
        calibration=ranker.calibration,
        content_blind=label_stable > item_stable,
        label_offsets=any(len(ranker.label_offsets.get(str(policy), ())) == len(c.candidates) for c in cases),
    )
    if report.full_vs_stock_max_abs_logit_diff > max_full_diff:
        report.failures.append(
            f"full prefill differs from the stock forward by {report.full_vs_stock_max_abs_logit_diff:.2e} "
            f"(> {max_full_diff:g}): this model's architecture is not reproduced exactly"
        )
    if policy.kind == "full":
        if report.max_abs_logit_diff > max_full_diff:
            report.failures.append(f"policy full differs from plain prefill by {report.max_abs_logit_diff:.2e}")
    else:
        if report.content_blind:
            report.failures.append(blind_message(report.top1_label_stable, report.top1_item_stable))
        if report.top1_agree < min_top1:
            report.failures.append(f"top-1 agreement {report.top1_agree:.3f} < {min_top1}")
        if report.kendall_tau < min_tau:
            report.failures.append(f"Kendall tau {report.kendall_tau:.3f} < {min_tau}")
        if report.kl > max_kl:
            report.failures.append(f"KL {report.kl:.4f} > {max_kl}")
    return report


def blind_message(label_stable: float, item_stable: float) -> str:
    return (
        "the model is content-blind: its answer follows the label, not the candidates (after rotating them the "
        f"best label stayed on top in {label_stable:.0%} of prompts, the best item in {item_stable:.0%}), so "
        "agreement with full prefill says nothing about fidelity. Fine-tune it (rcllm finetune) first."
    )


# --- the sweep: a grid of policies, their frontier, and the gate's choice -------------------


@dataclass
class FrontierRow:
    """One policy on the sweep's requests. ``full`` is the reference row (fidelity 1, speed-up 1)."""

    policy: str
    hr_at_1: float
    hr_at_10: float
    hr_at_1_delta: float  # against full prefill on the same requests
    hr_at_10_delta: float
    top1_agree: float
    kendall_tau: float
    kl: float
    recomputed_fraction: float  # token-layers recomputed / (prompt tokens * layers)
    prefill_ms: float  # mean wall time of the forward pass
    speedup: float  # full's mean prefill_ms / this policy's
    pareto: bool = False
    # half-widths of the 95% intervals (normal approximation over the requests; None under two):
    # the paired per-request change of each hit rate, and the top-1 agreement
    hr_at_1_delta_ci: float | None = None
    hr_at_10_delta_ci: float | None = None
    top1_agree_ci: float | None = None

    def delta(self, headline: str) -> float:
        """The change of the headline hit rate (``hr@10`` or ``hr@1``) against full prefill."""
        return self.hr_at_10_delta if headline == "hr@10" else self.hr_at_1_delta

    def delta_ci(self, headline: str) -> float | None:
        """The half-width of the 95% interval of :meth:`delta`."""
        return self.hr_at_10_delta_ci if headline == "hr@10" else self.hr_at_1_delta_ci


@dataclass(frozen=True)
class Thresholds:
    max_hr_delta: float = 0.01  # |change of the headline hit rate| against full prefill
    min_top1: float = 0.9  # top-1 agreement with full prefill


ROUNDING = 1e-9  # hit rates and agreements are counts over n requests: 0.63 - 0.64 is -0.01000000000000001


def gate_failures(row: FrontierRow, thresholds: Thresholds, headline: str) -> list[str]:
    """Why ``row`` misses the thresholds (empty: it meets them). A figure exactly at a threshold
    meets it, whatever float rounding the subtraction of two hit rates left."""
    failures = []
    delta = row.delta(headline)
    if abs(delta) > thresholds.max_hr_delta + ROUNDING:
        failures.append(f"|d{headline.upper()}| {abs(delta):.3f} > {thresholds.max_hr_delta:g}")
    if row.top1_agree < thresholds.min_top1 - ROUNDING:
        failures.append(f"top-1 agreement {row.top1_agree:.3f} < {thresholds.min_top1:g}")
    return failures


def undecided(row: FrontierRow, thresholds: Thresholds, headline: str) -> list[str]:
    """The thresholds whose verdict on ``row`` these requests do not settle: the 95% interval of
    the measure holds the threshold, so another draw of as many requests may well judge the
    other way (empty: every verdict is clear of its threshold, or there is no interval)."""
    notes = []
    delta, ci = row.delta(headline), row.delta_ci(headline)
    if ci is not None and ci > 0:
        low, high = delta - ci, delta + ci
        inside = -thresholds.max_hr_delta <= low and high <= thresholds.max_hr_delta
        outside = high < -thresholds.max_hr_delta or low > thresholds.max_hr_delta
        if not inside and not outside:
            notes.append(f"d{headline.upper()} {delta:+.3f} +/- {ci:.3f} against |d| <= {thresholds.max_hr_delta:g}")
    ci = row.top1_agree_ci
    if ci is not None and ci > 0 and row.top1_agree - ci < thresholds.min_top1 <= row.top1_agree + ci:
        notes.append(f"top-1 agreement {row.top1_agree:.3f} +/- {ci:.3f} against {thresholds.min_top1:g}")
    return notes


def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """Which points no other point dominates; every coordinate is better when larger. A point
    is dominated by one at least as good in every coordinate and better in one."""
    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, p) for other in points) for p in points]


def mark_front(rows: Sequence[FrontierRow], headline: str) -> None:
    """Set ``pareto`` on the rows no other row beats on fidelity (top-1 agreement, |change of
    the headline hit rate|, KL) and cost (recomputed share) together. Cost is the recomputed
    share, the work a policy spends, rather than the measured time, which a busy CPU makes noisy."""
    front = pareto_front([(r.top1_agree, -abs(r.delta(headline)), -r.kl, -r.recomputed_fraction) for r in rows])
    for row, on in zip(rows, front):
        row.pareto = on


@dataclass
class Choice:
    chosen: FrontierRow | None  # the cheapest policy meeting the thresholds; None if none does
    closest: FrontierRow | None  # without a choice: the policy that missed them by the least
    shortfall: list[str] = field(default_factory=list)  # how the closest one missed


def choose_policy(rows: Sequence[FrontierRow], thresholds: Thresholds, headline: str) -> Choice:
    """The cheapest policy other than ``full`` that meets ``thresholds`` (least recomputed share;
    among equally cheap ones the most faithful, then the fastest), so always one on the front.
    ``full`` is never the choice: a gate that can only pick full has found no reuse worth serving."""
    cheap = [r for r in rows if r.policy != "full"]
    passing = [r for r in cheap if not gate_failures(r, thresholds, headline)]
    if passing:
        best = min(passing, key=lambda r: (
            r.recomputed_fraction, -r.top1_agree, abs(r.delta(headline)), r.kl, r.prefill_ms,
        ))
        return Choice(best, None)
    if not cheap:
        return Choice(None, None, ["no policy other than full was measured"])

    def gap(r: FrontierRow) -> float:
        return max(0.0, abs(r.delta(headline)) - thresholds.max_hr_delta) + max(0.0, thresholds.min_top1 - r.top1_agree)

    closest = min(cheap, key=lambda r: (gap(r), r.recomputed_fraction))
    return Choice(None, closest, gate_failures(closest, thresholds, headline))


@dataclass
class SweepResult:
    rows: list[FrontierRow]  # the grid in the order asked, then full
    prompts: int
    candidates: int  # the most candidates in one request
    calibration: str
    top1_item_stable: float
    top1_label_stable: float
    # each policy's ranking of every request, in the order of the cases (full included); not part of the JSON
    rankings: dict[str, list[Ranking]] = field(default_factory=dict, repr=False)

    @property
    def content_blind(self) -> bool:
        return self.top1_label_stable > self.top1_item_stable

    @property
    def headline(self) -> str:
        return headline_hit_rate(self.candidates)


def run_sweep(
    ranker: Ranker,
    cases: Sequence[PromptCase],
    policies: Sequence[str] = DEFAULT_SWEEP,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    probe: bool = True,
) -> SweepResult:
    """Every case under full prefill and under each policy (history and item blocks cached, as
    a node serves them), ranked as eval ranks (calibrated label distribution, label offsets
    included), timed. ``probe``: also rank each case with its candidates rotated, the
    content-blindness probe (without it the result's stability shares are NaN).

    Blocks and the calibration prior are computed before anything is timed, and each case runs
    its policies back to back in a rotating order, so a machine that slows down mid-sweep slows
    every policy alike.
    """
    if not cases:
        raise ValueError("no held-out requests to sweep")
    names = []
    for p in policies:
        name = str(parse_policy(p))
        if name != "full" and name not in names:
            names.append(name)
    if not names:
        raise ValueError("no policy to sweep besides full")
    names.append("full")
    cap = ranker.builder.max_candidates
    for case in cases:
        if case.positive is None:
            raise ValueError("a sweep case needs its held-out item (PromptCase.positive)")
        if len(case.candidates) > cap:
            raise ValueError(
                f"{len(case.candidates)} candidates in one request; the sweep ranks at most {cap} (one label each)"
            )

    engine = ranker.engine
    source = MemoryBlockCache(engine, ranker.builder)
    prompts = []
    for case in cases:
        if ranker.calibration == "contextual":
            ranker.label_prior(len(case.candidates))
        prompts.append(ranker.segments(case.history, case.candidates, source)[0])
    engine.forward(uncached(prompts[0]), "full", logit_ids=ranker.logit_ids)  # first-call costs (allocation, lazy init) left untimed

    rankings: dict[str, list[Ranking]] = {name: [] for name in names}
    rng = random.Random(seed)
    item_stable = label_stable = 0
    for k, (case, segments) in enumerate(zip(cases, prompts)):
        n = len(case.candidates)
        turn = k % len(names)
        for name in names[turn:] + names[:turn]:
            result = engine.forward(uncached(segments) if name == "full" else segments, name, logit_ids=ranker.logit_ids)
            rankings[name].append(ranker.make_ranking(result, n, name, result.prefill_ms))
        if probe:
            item_kept, label_kept = top_after_rotation(ranker, case, rankings["full"][-1].order[0], rng)
            item_stable += item_kept
            label_stable += label_kept
        if progress:
            progress(k + 1, len(cases))

    ranks = {name: [rank_of(r.order, c.positive) for r, c in zip(rs, cases)] for name, rs in rankings.items()}
    full_ms = statistics.fmean(r.ttft_ms for r in rankings["full"])
    rows = []
    for name in names:
        hr1 = sum(r < 1 for r in ranks[name]) / len(cases)
        hr10 = sum(r < 10 for r in ranks[name]) / len(cases)
        f = fidelity(rankings["full"], rankings[name], ranks["full"], ranks[name])
        ms = statistics.fmean(r.ttft_ms for r in rankings[name])
        paired = {k: [float(a < k) - float(b < k) for a, b in zip(ranks[name], ranks["full"])] for k in (1, 10)}
        agreed = [float(a.order[0] == b.order[0]) for a, b in zip(rankings[name], rankings["full"])]
        rows.append(FrontierRow(
            policy=name, hr_at_1=hr1, hr_at_10=hr10, hr_at_1_delta=f["hr@1_delta"], hr_at_10_delta=f["hr@10_delta"],
            top1_agree=f["top1_agree"], kendall_tau=f["kendall_tau"], kl=f["kl"],
            recomputed_fraction=statistics.fmean(r.recomputed_fraction for r in rankings[name]),
            prefill_ms=ms, speedup=full_ms / ms if ms > 0 else float("inf"),
            hr_at_1_delta_ci=mean_half_width(paired[1]), hr_at_10_delta_ci=mean_half_width(paired[10]),
            top1_agree_ci=mean_half_width(agreed),
        ))
    result = SweepResult(
        rows=rows, prompts=len(cases), candidates=max(len(c.candidates) for c in cases),
        calibration=ranker.calibration, top1_item_stable=item_stable / len(cases) if probe else math.nan,
        top1_label_stable=label_stable / len(cases) if probe else math.nan, rankings=rankings,
    )
    mark_front(result.rows, result.headline)
    return result
