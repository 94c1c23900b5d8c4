"""A report's tables as files for other tools: CSV (a spreadsheet, pandas) and a LaTeX
``tabular`` (booktabs rules) to ``\\input`` in a paper. The cells are the report's own text."""

from __future__ import annotations

import csv
import io

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "×": r"$\times$", "Δ": r"$\Delta$", "<": r"$<$", ">": r"$>$"}


def to_csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(rows: list[list[str]], caption: str = "") -> str:
    """A ``tabular`` with the first column left-aligned and the others right-aligned; needs
    ``\\usepackage{booktabs}``."""
    spec = "l" + "r" * (len(rows[0]) - 1)
    body = [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    head = [f"% {latex_escape(caption)}"] if caption else []
    return "\n".join([*head, rf"\begin{{tabular}}{{{spec}}}", r"\toprule", body[0], r"\midrule", *body[1:],
                      r"\bottomrule", r"\end{tabular}", ""])
