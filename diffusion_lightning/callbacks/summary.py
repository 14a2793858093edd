"""The model summary printed when training starts."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count


class ModelSummary(RichModelSummary):
    """Lightning's rich summary table without its FLOPs column and ``Total FLOPs: 0`` line (Lightning counts FLOPs
    only through an ``example_input_array``, which these models do not define, so it always printed 0), and the
    totals on one line."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if "Params" in name or "sizes" in name else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(f"[bold]params[/]: {get_human_readable_count(int(trainable_parameters)).strip()} trainable, "
                      f"{get_human_readable_count(int(frozen)).strip()} frozen ({model_size:.1f} MB); modules: "
                      f"{total_training_modes['train']} in train mode, {total_training_modes['eval']} in eval mode",
                      soft_wrap=True)  # fmt: skip
