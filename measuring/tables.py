"""
A result table as JSON: records, values, and whether its index carries data.

Shared by the worker (previews) and the server (Job Result pages). pandas and numpy are imported
only inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import datetime
import decimal
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def has_own_index(frame: pd.DataFrame) -> bool:
    """True when the index carries data (a named or non-default index), so it must be kept."""
    import pandas as pd

    index = frame.index
    return not (
        isinstance(index, pd.RangeIndex)
        and index.name is None
        and index.start == 0
        and index.step == 1
    )


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` as JSON-ready records, its index first when it carries data."""
    if has_own_index(frame):
        frame = frame.reset_index(allow_duplicates=True)
    columns = [str(column) for column in frame.columns]
    return [
        {column: json_value(value) for column, value in zip(columns, row, strict=True)}
        for row in frame.itertuples(index=False, name=None)
    ]


def json_value(value: Any) -> Any:
    """
    ``value`` as plain JSON: numpy and pandas scalars unwrapped, times as ISO 8601 strings,
    NaN, infinities and missing values as null.
    """
    import numpy as np
    import pandas as pd

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.datetime64 | np.timedelta64):
        value = pd.Timestamp(value) if isinstance(value, np.datetime64) else pd.Timedelta(value)
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        return json_value(value.item())
    if isinstance(value, datetime.date | datetime.time | pd.Timedelta):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return pd.Timedelta(value).isoformat()
    if isinstance(value, decimal.Decimal):
        return json_value(float(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple | np.ndarray):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    return str(value)
