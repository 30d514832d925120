# Type stub for the compiled msgpack record decoder (adapters/_msgpack.pyx).
import numpy as np
import numpy.typing as npt

ROW_STATUS: tuple[str, ...]
STOP: tuple[str, ...]

class RecordDecoder:
    slots: int
    def __init__(
        self,
        slots: int,
        positions: list[int],
        keys: list[bytes],
        key_slots: list[int],
        required: list[bool],
        str_maps: list[dict[bytes, int] | None],
        int_maps: list[dict[int, int] | None],
    ) -> None: ...
    def decode(
        self, message: bytes | memoryview
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], int, int, int, int
    ]: ...
