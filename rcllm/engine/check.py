"""The per-model correctness gate: how faithful is a policy to a plain prefill, on ranking prompts?

Agreement alone proves nothing on a model that ignores the candidates (one that always answers
``A`` agrees with itself whatever the cache does), so the report also measures whether the
model's ranking depends on the candidates at all: after shuffling the candidates, does the same
*item* stay on top (content-aware) or the same *label* (content-blind)?
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from rcllm.data.sampling import sample_requests
from rcllm.engine.blocks import uncached
from rcllm.engine.policy import parse_policy
from rcllm.engine.prompt import item_text
from rcllm.engine.ranker import MemoryBlockCache, Ranker
from rcllm.eval.metrics import kendall_tau, kl_divergence


@dataclass
class PromptCase:
    history: list[str]  # item texts, oldest first
    candidates: list[str]  # item texts, prompt order


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
    top1_item_stable: float  # share of prompts whose best item survives shuffling the candidates
    top1_label_stable: float  # share whose best *label* survives it (high = content-blind)
    label_bias: float  # share of prompts whose uncalibrated answer is the most frequent label
    recomputed_fraction: float
    calibration: str
    content_blind: bool
    failures: list[str] = field(default_factory=list)

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
    """Every prompt both ways: plain prefill, and ``policy`` with the history and all item blocks cached."""
    if not cases:
        raise ValueError("no sample prompts to check")
    policy = parse_policy(policy)
    engine = ranker.engine
    cache = MemoryBlockCache(engine, ranker.builder)
    rng = random.Random(seed)
    diffs, stock_diffs, top1, taus, kls, fractions = [], [], [], [], [], []
    item_stable = label_stable = 0
    raw_answers: Counter = Counter()
    for case in cases:
        n = len(case.candidates)
        cached, _ = ranker.segments(case.history, case.candidates, cache)
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
        top1.append(int(cal_full.argmax()) == int(cal_reused.argmax()))
        taus.append(kendall_tau(cal_full.tolist(), cal_reused.tolist()))
        kls.append(kl_divergence(cal_full.tolist(), cal_reused.tolist()))
        raw_answers[int(raw_full.argmax())] += 1

        perm = list(range(n))
        while n > 1 and perm == sorted(perm):
            rng.shuffle(perm)
        shuffled = ranker.rank(case.history, [case.candidates[i] for i in perm], "full")
        best_item, best_slot = int(cal_full.argmax()), shuffled.order[0]
        item_stable += perm[best_slot] == best_item
        label_stable += best_slot == best_item

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
        if report.top1_agree < min_top1:
            report.failures.append(f"top-1 agreement {report.top1_agree:.3f} < {min_top1}")
        if report.kendall_tau < min_tau:
            report.failures.append(f"Kendall tau {report.kendall_tau:.3f} < {min_tau}")
        if report.kl > max_kl:
            report.failures.append(f"KL {report.kl:.4f} > {max_kl}")
    return report


def sample_cases(dataset, n_prompts: int, history: int, candidates: int, seed: int) -> list[PromptCase]:
    """Ranking prompts drawn from a dataset's leave-one-out requests, as item texts."""
    requests = sample_requests(dataset, n_prompts, history=history, candidates=candidates, seed=seed)
    texts = {i: item_text(item) for i, item in dataset.items.items()}
    return [PromptCase([texts[i] for i in r.history], [texts[i] for i in r.candidates]) for r in requests]
