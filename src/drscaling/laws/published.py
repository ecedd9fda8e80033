"""The laws the paper publishes, written once: Table 1 (L(N)) and Table 2 (L(D)) per dataset, and the
joint law of eqs. 8-10 (MS MARCO only). The form registry shows them beside our fits (the report's
"paper" rows) and the budget runs them as law sets (drscaling.budget.law_sets)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperLaw:
    kind: str
    params: dict[str, float]
    r2: float | None  # as printed in the paper; None where it prints none (the joint law)
    where: str  # table or equation

    @property
    def reference(self) -> dict[str, float]:
        """The parameters with the printed R^2, as the report compares them."""
        return dict(self.params) if self.r2 is None else {**self.params, "r2": self.r2}


def _tables(table_1: tuple[float, float, float, float], table_2: tuple[float, float, float, float]
            ) -> dict[str, PaperLaw]:
    """One dataset's rows of Table 1 (A, alpha, delta, R^2) and Table 2 (B, beta, delta, R^2)."""
    a, alpha, delta_n, r2_n = table_1
    b, beta, delta_d, r2_d = table_2
    return {
        "N": PaperLaw("N", {"A": a, "alpha": alpha, "delta": delta_n}, r2_n, "Table 1"),
        "D": PaperLaw("D", {"B": b, "beta": beta, "delta": delta_d}, r2_d, "Table 2"),
    }


MSMARCO_LAWS: dict[str, PaperLaw] = {
    **_tables((3.22e4, 0.53, 0.04, 0.991), (3.49e3, 1.05, 0.05, 0.954)),
    "ND": PaperLaw("ND", {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03}, None, "eqs. 8-10"),
}
T2RANKING_LAWS: dict[str, PaperLaw] = _tables((9.89e6, 0.53, 0.14, 0.999), (6.04e4, 0.50, 0.15, 0.991))
