"""Resolving and validating the feature and weight columns, with errors that name the problem."""

from __future__ import annotations

from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.sql import Column, DataFrame, functions as F
from pyspark.sql.types import ArrayType, NumericType


class InvalidInputError(ValueError):
    """The input data cannot be clustered as given; the message says which column and why."""


def _field(df: DataFrame, name: str, role: str):
    fields = {f.name: f for f in df.schema.fields}
    if name not in fields:
        raise InvalidInputError(
            f"{role} column '{name}' not found; available columns: {', '.join(fields) or '(none)'}"
        )
    return fields[name]


def feature_array(df: DataFrame, features_col: str, input_cols: list[str] | None) -> Column:
    """The features as one `array<double>` column, from a vector, a numeric array or numeric columns."""
    if input_cols:
        for name in input_cols:
            field = _field(df, name, "input")
            if not isinstance(field.dataType, NumericType):
                raise InvalidInputError(
                    f"input column '{name}' has type {field.dataType.simpleString()}; "
                    "inputCols must be numeric columns"
                )
        return F.array(*[F.col(f"`{name}`").cast("double") for name in input_cols])
    field = _field(df, features_col, "features")
    kind = field.dataType
    if isinstance(kind, VectorUDT):
        column = F.col(f"`{features_col}`")
        return F.when(column.isNotNull(), vector_to_array(column, "float64"))
    if isinstance(kind, ArrayType) and isinstance(kind.elementType, NumericType):
        return F.col(f"`{features_col}`").cast("array<double>")
    raise InvalidInputError(
        f"features column '{features_col}' has type {kind.simpleString()}; expected a vector, "
        "an array of numbers, or set inputCols to numeric columns"
    )


def weight_column(df: DataFrame, weight_col: str | None) -> Column | None:
    if not weight_col:
        return None
    field = _field(df, weight_col, "weight")
    if not isinstance(field.dataType, NumericType):
        raise InvalidInputError(
            f"weight column '{weight_col}' has type {field.dataType.simpleString()}; it must be numeric"
        )
    return F.col(f"`{weight_col}`").cast("double")
