"""How often the diagnosis of a mutant's failed block comparison names a cause.

Runs every mutant of tests/mutants.py (single pitfalls, the new ones and the combined
ones) through the block comparisons (``agree_*``, ``exact_*``) of a set of cases and
counts the failed records whose diagnosis names a cause, and those naming a wrong one
(tests/diagnosis_readings.py); ``--all`` runs every case of the catalogue, ``-v``
prints the wrong ones::

    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/measure_diagnoses.py

On the ten cases below, 42 mutants (26 single, 8 new, 8 combined) fail 1926 block
comparisons. Diagnoses of a single named pitfall or scale (before the combined and
squared explanations) named a cause for 1467 of them (76.2 %), 113 of them a wrong
one (coinciding scales named as one, e.g. ``T`` where ``T = 2`` is the MSE factor);
with them, 1791 (93.0 %) name a cause and none a wrong one (single 96.6 % → 96.6 %,
new 37.2 % → 85.7 %, combined 78.6 % → 93.7 %). On the whole catalogue (``--all``):
12334 failed comparisons, 9530 (77.3 %) named with 774 wrong before, 11601 (94.1 %)
named with none wrong after.
"""

from __future__ import annotations

import sys

SILENT = (
    "no known pitfall explains this",
    "matching no known scale",
    "inconclusive on this case",
    "no diagnosis:",
    "diagnosis failed",
)
CASES = [
    "mlp_tanh_mse_mean",
    "mlp_tanh_cro_mean",
    "seq_ce_mean",
    "seq_reduce_meanpool_mse_mean",
    "conv_pool_k3_stride2_mse_mean",
    "conv_pixel_k3_dilation2_mse_mean",
    "conv_pixel_k3_pad1_mse_mean",
    "conv_pixel_then_1x1_mse_mean",
    "deep_linear_d2_cro_sum",
    "one_datum_mse_mean",
]


def names_a_cause(diagnosis: str | None) -> bool:
    """Whether a diagnosis (of any version of the oracle) names a cause."""
    if not diagnosis:
        return False
    if diagnosis.startswith("a constant factor") and any(
        s in diagnosis for s in SILENT
    ):
        return False
    return not diagnosis.startswith(SILENT[0]) and not diagnosis.startswith(SILENT[3:])


def _ties_as_alternatives(diagnosis: str | None) -> str | None:
    """Earlier versions named coinciding scales as ``A (...) = B (...)``: read them as
    alternatives, like today's ``ambiguous on this case`` lists."""
    if diagnosis and "ambiguous" not in diagnosis:
        return diagnosis.replace(") = ", "); or by ")
    return diagnosis


def main() -> None:
    from kfac_oracle.catalogue import get_case
    from kfac_oracle.runner.run import run
    from tests import mutants as m
    from tests.diagnosis_readings import wrong_cause

    groups = {
        "single": m.MUTANTS,
        "new": m.DIAGNOSIS_MUTANTS,
        "combined": m.COMBINED_MUTANTS,
    }
    if "--all" in sys.argv:  # every case of the catalogue (slow)
        from kfac_oracle.catalogue import load_cases

        cases = load_cases()
    else:
        cases = [get_case(c) for c in CASES]
    total = {"failed": 0, "named": 0, "wrong": 0}
    for group, mutants in groups.items():
        counts = {"failed": 0, "named": 0, "wrong": 0}
        for mutant in mutants:
            records = run(
                mutant(), cases, checks=["agree_*", "exact_*"], isolation="none"
            )
            for r in records:
                if r.status not in ("failed", "error"):
                    continue
                counts["failed"] += 1
                counts["named"] += names_a_cause(r.diagnosis)
                wrong = wrong_cause(_ties_as_alternatives(r.diagnosis), mutant.causes)
                counts["wrong"] += names_a_cause(r.diagnosis) and wrong
                if "-v" in sys.argv and wrong:
                    print(f"  wrong: {mutant.name} {r.id}: {r.diagnosis}")
        for k in total:
            total[k] += counts[k]
        _print(group, counts)
    _print("all", total)


def _print(group: str, c: dict[str, int]) -> None:
    share = c["named"] / c["failed"] if c["failed"] else 0.0
    print(
        f"{group:9s} failed {c['failed']:5d}  named {c['named']:5d} ({share:.1%})"
        f"  wrong {c['wrong']:4d}"
    )


if __name__ == "__main__":
    main()
