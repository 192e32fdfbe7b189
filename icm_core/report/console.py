"""The plain-text results table the CLI prints (no torch: a run answered from its record prints it too)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text results table."""
    header = f"{'category':<14}{'PPL base':>10}{'PPL LoRA':>10}{'PPL ICM':>10}{'BPC base':>10}{'BPC LoRA':>10}"
    header += f"{'BPC ICM':>10}{'gain':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        gain = row.get("gain_recovered")
        lines.append(
            f"{row['category']:<14}{row['ppl_base']:>10.3f}{row['ppl_lora']:>10.3f}{row['ppl_icm_lora']:>10.3f}"
            f"{row['bpc_base']:>10.4f}{row['bpc_lora']:>10.4f}{row['bpc_icm_lora']:>10.4f}"
            + (f"{gain:>8.1%}" if gain is not None else f"{'n/a':>8}")
        )
    return "\n".join(lines)
