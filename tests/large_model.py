"""The tables of the generated model over 2 GB that the large-model tests share: three
float32 tables of ROWS x COLS written to one external-data file, block by block, so that
no test holds them in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

ROWS, COLS, TABLES = 200_000, 1_024, 3  # 3 tables x 819 MB = 2.46 GB


def table_block(t: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of table ``t``: row i holds ``i * (t + 1) + j / COLS`` in column j."""
    return (np.arange(start, stop, dtype=np.float32)[:, None] * (t + 1)
            + np.arange(COLS, dtype=np.float32)[None, :] / COLS)


def write_tables(folder: Path) -> tuple[Path, list[onnx.TensorProto]]:
    """Write the tables to ``big.onnx.data`` in ``folder`` (the model beside it is to be
    ``big.onnx``); returns that file and the initializers ``table0`` ... pointing into it."""
    data = folder / "big.onnx.data"
    inits = []
    with open(data, "wb") as f:
        for t in range(TABLES):
            offset = f.tell()
            for start in range(0, ROWS, 10_000):
                f.write(table_block(t, start, start + 10_000).tobytes())
            tensor = onnx.TensorProto(name=f"table{t}", data_type=onnx.TensorProto.FLOAT, dims=[ROWS, COLS])
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                tensor.external_data.add(key=k, value=v)
            inits.append(tensor)
    return data, inits
