"""Calibration of the Monte-Carlo statistics (kfac_oracle.statistics): false alarms and
power, printed as tables.

False alarms: the reference MC-KFAC and an independent implementation
(``tests/mc_candidates.py``) run the check's plan (``PLAN``, one repeated seed) for
``--sets`` seed sets on every case and layer of the catalogue with an MC-convergence
claim, and on CE and BCE cases with ``reduction="sum"``. Seed set ``j`` uses candidate
seeds ``j·1000 + k``; the reference draws come from ``--pools`` independent pools of
``REFERENCE_DRAWS`` draws per M (pool ``p`` serves the seed sets ``j`` with
``j mod pools = p``). Every verdict must pass.

Power: each wrong candidate of ``tests/mc_candidates.WRONG`` runs ``--power-sets`` seed
sets per case; the table gives how often it was caught and by which test.

Run: ``OMP_NUM_THREADS=1 python benchmarks/mc_calibration.py`` (about 40 minutes on
one core with the defaults; ``--sets 20 --pools 4 --power-sets 3`` takes about 5;
``--tails 20000`` adds about 15).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kfac_oracle import statistics as st  # noqa: E402
from kfac_oracle.catalogue import load_cases  # noqa: E402
from kfac_oracle.conventions import kronecker_block  # noqa: E402
from kfac_oracle.flavours import Flavour  # noqa: E402
from kfac_oracle.reference.kfac import KFACSteps  # noqa: E402
from kfac_oracle.reference.mc_draws import reference_draws  # noqa: E402
from tests.mc_candidates import WRONG, independent_mc_kfac  # noqa: E402

EXTRA = ("mlp_tanh_cro_sum", "mlp_tanh_bce_sum", "seq_ce_sum")


def targets(extra=EXTRA) -> list[tuple]:
    """``(case, layer, kfac_approx)`` with an MC claim, plus the extra sum cases."""
    out = []
    cases = {c.id: c for c in load_cases()}
    for case in cases.values():
        for layer in case.layers:
            for claim in case.claims_for(layer):
                if claim.statement == "mc_convergence":
                    out.append((case, layer, claim.kfac_approx))
    for cid in extra:
        mean = cases[cid.replace("_sum", "_mean")]
        for _, layer, approx in [t for t in out if t[0] is mean]:
            if (cases[cid], layer, approx) not in out:
                out.append((cases[cid], layer, approx))
    return out


class Target:
    """One case and layer: its problem, type-2 block and block makers."""

    def __init__(self, case, layer: str, approx: str):
        self.case, self.layer, self.approx = case, layer, approx
        self.problem = case.build()
        self.id = f"{case.id}[{layer}]"
        f = KFACSteps().factors(
            self.problem, "type-2", [layer], kfac_approx=approx, bias="joint"
        )
        self.B = kronecker_block(f[layer])

    def steps_block(self, steps: KFACSteps, M: int, seed: int):
        f = steps.factors(
            self.problem,
            "mc",
            [self.layer],
            kfac_approx=self.approx,
            bias="joint",
            mc_samples=M,
            seed=seed,
        )
        return kronecker_block(f[self.layer])

    def independent_block(self, M: int, seed: int):
        p = self.problem
        f = independent_mc_kfac(
            p.model, p.loss_func, p.data, self.layer, self.approx, M, seed
        )
        return kronecker_block(f)

    def nulls(self, pool: int, R: int = st.REFERENCE_DRAWS) -> dict:
        """The null models as the check builds them (one batched stream per M);
        pool ``p`` uses the seed ``REFERENCE_SEED_OFFSET + p``."""
        out = {}
        for M, _ in st.PLAN:
            flavour = Flavour(
                "mc", self.approx, "joint", M, st.REFERENCE_SEED_OFFSET + pool
            )
            draws = reference_draws(self.problem, flavour, R, [self.layer])[self.layer]
            out[M] = st.null_model(draws, self.B, M)
        return out


def run_plan(make_block, seed_base: int):
    """The candidate's blocks over the plan and one repeated seed."""
    cand = {
        M: torch.stack([make_block(M, seed_base + s) for s in st.candidate_seeds(K)])
        for M, K in st.PLAN
    }
    top = max(cand)
    return cand, (cand[top][0], make_block(top, seed_base))


def margins(verdict) -> dict:
    """Per test kind, how close the statistic came to its bound (1 = at the bound)."""
    out = {}
    for t in verdict.tests:
        if t.alpha == 0:
            continue
        if t.name == "scale":
            m = t.value / t.high if t.value >= 0 else t.value / t.low
        elif t.name == "frobenius":
            m = t.value / t.high
        else:  # spread: log-ratio against the log-bound on its side
            if t.value >= 1:
                m = math.log(t.value) / math.log(t.high)
            else:
                m = math.log(t.value) / math.log(t.low) if t.value > 0 else math.inf
        out[t.name] = max(out.get(t.name, 0.0), m)
    return out


def false_alarms(tgts, sets: int, pools: int, log=print):
    """Rows ``(target, impl, verdicts, failures, margins, warnings)``."""
    rows = []
    for tg in tgts:
        t0 = time.time()
        nulls = [tg.nulls(p) for p in range(pools)]
        t_null = time.time() - t0
        for impl in ("reference", "independent"):
            if impl == "reference":
                steps = KFACSteps()
                make = lambda M, s, steps=steps, tg=tg: tg.steps_block(steps, M, s)  # noqa: E731
            else:
                make = tg.independent_block
            fails, worst, warn = [], defaultdict(float), 0
            t1 = time.time()
            for j in range(sets):
                cand, rep = run_plan(make, j * 1000)
                v = st.mc_verdict(cand, nulls[j % pools], repeat=rep)
                if not v.passed:
                    fails.append((j, v.message))
                warn += v.gaussian_warning
                for k, m in margins(v).items():
                    worst[k] = max(worst[k], m)
            rows.append((tg.id, impl, sets, fails, dict(worst), warn))
            log(
                f"  {tg.id:30s} {impl:11s} {sets} sets, {len(fails)} failed, "
                f"worst margins {_fmt(worst)} ({time.time() - t1:.0f} s; reference "
                f"pools {t_null:.0f} s)"
            )
            for j, msg in fails:
                log(f"    FAILED set {j}: {msg}")
    return rows


def power(tgts, sets: int, pools: int, wrong=WRONG, log=print):
    """Rows ``(wrong, target, caught, sets, failing tests, example)``."""
    rows = []
    for tg in tgts:
        nulls = [tg.nulls(p) for p in range(min(pools, sets))]
        for name, cls in wrong.items():
            steps = cls()
            caught, kinds, example = 0, Counter(), ""
            for j in range(sets):
                cand, rep = run_plan(
                    lambda M, s, steps=steps, tg=tg: tg.steps_block(steps, M, s),
                    500_000 + j * 1000,
                )
                v = st.mc_verdict(cand, nulls[j % len(nulls)], repeat=rep)
                if not v.passed:
                    caught += 1
                    for t in v.failures:
                        kinds[_kind(t)] += 1
                    if not example:
                        example = _short(v.failures[0])
            rows.append((name, tg.id, caught, sets, kinds, example))
            log(f"  {name:24s} {tg.id:30s} caught {caught}/{sets} {dict(kinds)}")
    return rows


def tail_check(tg, M: int, draws: int, K: int, resamples: int, levels, log=print):
    """Tails of the scale statistic of a K-mean, by resampling many reference draws.

    ``T = (ū − 1)/(σ/√K)`` over ``resamples`` means of ``K`` of ``draws`` reference
    draws (σ from all draws, so only the shape of the distribution is tested). For each
    level, the frequency of ``T`` beyond the Pearson III and the normal quantiles of
    that level (upper and lower tail) divided by the level: 1 is exact.
    """
    steps = KFACSteps()
    B = tg.B
    bb = float((B * B).sum())
    seeds = range(3 * st.REFERENCE_SEED_OFFSET, 3 * st.REFERENCE_SEED_OFFSET + draws)
    u = torch.tensor(
        [float((tg.steps_block(steps, M, s) * B).sum()) / bb for s in seeds]
    )
    d = u - 1
    sd = float(d.pow(2).mean().sqrt())
    c = d - d.mean()
    skew = float(c.pow(3).mean()) / float(c.pow(2).mean()) ** 1.5
    g = torch.Generator().manual_seed(0)
    T = []
    for _ in range(max(resamples // 10**6, 1)):
        idx = torch.randint(0, draws, (10**6, K), generator=g)
        T.append(d[idx].mean(1) / (sd / math.sqrt(K)))
    T = torch.cat(T)
    rows = []
    for level in levels:
        up_g = st._ratio_quantile(level, skew / math.sqrt(K), math.inf)
        lo_g = st._ratio_quantile(level, -skew / math.sqrt(K), math.inf)
        z = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - level)))
        row = (
            float((T > up_g).double().mean()) / level,
            float((T < -lo_g).double().mean()) / level,
            float((T > z).double().mean()) / level,
            float((T < -z).double().mean()) / level,
        )
        rows.append((level, row))
    log(
        f"  {tg.id:30s} M={M} skew {skew:+.2f}: "
        + "; ".join(
            f"level {lv:.0e}: gamma {r[0]:.2f}/{r[1]:.2f}, normal {r[2]:.2f}/{r[3]:.2f}"
            for lv, r in rows
        )
    )
    return tg.id, M, skew, rows


def _kind(t) -> str:
    return f"{t.name}@M={t.mc_samples}" if t.mc_samples is not None else t.name


def _short(t) -> str:
    if t.name in ("finite", "shape", "reproducible", "exact"):
        return f"{_kind(t)}"
    if t.name == "scale":
        return f"{_kind(t)} T={t.value:+.1f} not in [{t.low:.1f}, {t.high:.1f}]"
    if t.name == "frobenius":
        return f"{_kind(t)} {t.value:.3g} > {t.high:.3g}"
    return f"{_kind(t)} {t.value:.3g} not in [{t.low:.3g}, {t.high:.3g}]"


def _fmt(worst) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(worst.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--pools", type=int, default=20)
    parser.add_argument("--power-sets", type=int, default=10)
    parser.add_argument("--cases", default="", help="substring filter on case ids")
    parser.add_argument("--wrong", default="", help="substring filter on wrong ones")
    parser.add_argument("--skip-power", action="store_true")
    parser.add_argument("--skip-false-alarms", action="store_true")
    parser.add_argument(
        "--tails",
        type=int,
        default=0,
        metavar="DRAWS",
        help="also check the scale statistic's tails at M = 1, 2, 3 by resampling "
        "DRAWS reference draws (e.g. 20000)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    tgts = [Target(*t) for t in targets() if args.cases in t[0].id]
    plan = ", ".join(f"M={M}: K={K}" for M, K in st.PLAN)
    calls = sum(K for _, K in st.PLAN) + 1
    print(
        f"plan {plan} (+1 repeated seed: {calls} candidate calls); "
        f"{st.REFERENCE_DRAWS} reference draws per M; stated false-alarm bound "
        f"{st.FALSE_ALARM:g} per verdict (tests at {st.FALSE_ALARM / st.SAFETY:g})"
    )
    if not args.skip_false_alarms:
        print(f"\nFalse alarms ({args.sets} seed sets, {args.pools} reference pools)")
        rows = false_alarms(tgts, args.sets, args.pools)
        print(
            "\n| case[layer] | implementation | verdicts | failed | worst margin "
            "(statistic / bound) | skew warnings |"
        )
        print("|---|---|---|---|---|---|")
        for tid, impl, n, fails, worst, warn in rows:
            print(f"| {tid} | {impl} | {n} | {len(fails)} | {_fmt(worst)} | {warn} |")
        total = sum(len(r[3]) for r in rows)
        print(f"\ntotal: {total} false alarms in {sum(r[2] for r in rows)} verdicts")
    if not args.skip_power:
        print(f"\nPower ({args.power_sets} seed sets per wrong candidate and case)")
        wrong = {k: v for k, v in WRONG.items() if args.wrong in k}
        rows = power(tgts, args.power_sets, args.pools, wrong)
        print("\n| wrong candidate | case[layer] | caught | failing tests | example |")
        print("|---|---|---|---|---|")
        for name, tid, caught, n, kinds, ex in rows:
            k = ", ".join(f"{a} ({b})" for a, b in kinds.most_common(3))
            print(f"| {name} | {tid} | {caught}/{n} | {k} | {ex} |")
        print("\nCaught on some case (all seed sets):")
        for name in wrong:
            where = [r[1] for r in rows if r[0] == name and r[2] == r[3]]
            print(f"  {name:24s} {len(where)}/{len(tgts)}: {', '.join(where) or '-'}")
    if args.tails:
        K = dict(st.PLAN)[1]
        print(
            f"\nTails of the scale statistic (K = {K}, {args.tails} draws, 10^7 "
            "resampled K-means): frequency beyond the quantile / level, upper/lower"
        )
        rows = [  # a sum case's blocks are its mean case's times a constant
            tail_check(tg, M, args.tails, K, 10**7, (1e-4, 1e-5, 1e-6))
            for tg in tgts
            if tg.case.reduction == "mean"
            for M in (1, 2, 3)
        ]
        print(
            "\n| case[layer] | M | skewness | level | Pearson III upper/lower | "
            "normal upper/lower |"
        )
        print("|---|---|---|---|---|---|")
        for tid, M, skew, lv in rows:
            for level, r in lv:
                print(
                    f"| {tid} | {M} | {skew:+.2f} | {level:.0e} | {r[0]:.2f} / "
                    f"{r[1]:.2f} | {r[2]:.2f} / {r[3]:.2f} |"
                )
    print(f"\nwall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
