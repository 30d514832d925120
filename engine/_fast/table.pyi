# Type stub for the compiled instruction-table pass (engine/_fast/table.pyx).
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

class TableBuilder:
    n_rules: int
    def __init__(
        self,
        seeds: npt.NDArray[np.uint64],
        priorities: npt.NDArray[np.int32],
        params: list[Sequence[int]],
        rule_ids: list[str],
        templates: list[str],
        channels: list[str],
        column_names: list[str],
    ) -> None: ...
    def build(
        self,
        columns: tuple[npt.NDArray[np.integer] | None, ...],
        n_events: int,
        output: tuple[npt.NDArray[np.generic], ...],
        fired: tuple[npt.NDArray[np.generic], ...],
    ) -> dict[str, npt.NDArray[np.generic]]: ...
