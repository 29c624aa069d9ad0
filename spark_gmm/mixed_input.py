"""Mixed input columns → packed float64 rows for `MixedMixture`: column typing, the one survey
pass (levels, ranges, missing and unusable counts), value coding in Spark SQL, and cached blocks
that keep NaN for what is missing.

A row is packed as `latent.Columns` says: Gaussian columns, then Bernoulli (0/1), categorical
(level codes) and count columns, every missing value NaN. Bernoulli and categorical values become
codes in Spark SQL (`coded`: the position in the model's value list, -1 for a value the model has
not seen), so every column reaches Python as a double and one rule (`unusable`) decides what a
value is worth, at fit and at scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, functions as F
from pyspark.sql.types import BooleanType, DoubleType, FloatType, IntegralType, NumericType, StringType

from .blocks import (
    BLOCK_SCHEMA,
    NO_COUNTS,
    BlockCache,
    block_batch,
    block_rows_for,
    content_digest,
    partition_id,
)
from .exceptions import InvalidInputError
from .inputs import named_column
from .latent import Columns
from .rows import RowBlocker

#: Feature kinds in packing order (the order of `latent.Columns`).
KINDS = ("gaussian", "bernoulli", "categorical", "poisson")
#: Which Spark types each kind accepts.
ACCEPTED = {
    "gaussian": (NumericType,),
    "bernoulli": (NumericType, BooleanType, StringType),
    "categorical": (IntegralType, BooleanType, StringType),
    "poisson": (NumericType,),
}
#: What a value that is present but unusable is, per kind (one wording for every message).
UNUSABLE = {
    "gaussian": "infinite values",
    "bernoulli": "values not seen in the fit",
    "categorical": "levels not seen in the fit",
    "poisson": "counts that are not whole numbers ≥ 0",
}


@dataclass(frozen=True)
class Feature:
    """One input column: its kind and, for Bernoulli and categorical columns, its values in code
    order (a Bernoulli column's value coded 0, then 1)."""

    name: str
    kind: str
    values: tuple = ()


@dataclass(frozen=True)
class MixedSchema:
    """The features in packing order, and the shift subtracted from each packed column (the
    midpoint of each Gaussian column's finite values, 0 for the others)."""

    features: tuple[Feature, ...]
    shift: np.ndarray

    @property
    def columns(self) -> Columns:
        return Columns(*(len(self.names(kind)) for kind in KINDS))

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(len(f.values) for f in self.features if f.kind == "categorical")

    def names(self, kind: str) -> list[str]:
        return [f.name for f in self.features if f.kind == kind]

    def of(self, kind: str) -> list[Feature]:
        return [f for f in self.features if f.kind == kind]

    def to_dict(self) -> dict:
        return {"features": [[f.name, f.kind, list(f.values)] for f in self.features], "shift": self.shift.tolist()}

    @classmethod
    def from_dict(cls, saved: dict) -> "MixedSchema":
        features = tuple(Feature(name, kind, tuple(values)) for name, kind, values in saved["features"])
        return cls(features, np.asarray(saved["shift"], dtype=np.float64))


def typed_features(df: DataFrame, by_kind: dict[str, list[str]]) -> list[Feature]:
    """The features in packing order, their columns checked to exist once, with a usable type."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    seen: dict[str, str] = {}
    features = []
    for kind in KINDS:
        for name in by_kind.get(kind) or []:
            if name in seen:
                raise InvalidInputError(f"column '{name}' is given as both {seen[name]} and {kind}")
            if name not in fields:
                raise InvalidInputError(f"{kind} column '{name}' not found; available columns: {', '.join(fields)}")
            if not isinstance(fields[name], ACCEPTED[kind]):
                allowed = ", ".join(t.__name__.replace("Type", "").lower() for t in ACCEPTED[kind])
                raise InvalidInputError(
                    f"{kind} column '{name}' has type {fields[name].simpleString()}; expected {allowed}"
                )
            seen[name] = kind
            features.append(Feature(name, kind))
    if not features:
        raise InvalidInputError("no feature columns: set gaussianCols, bernoulliCols, categoricalCols or poissonCols")
    return features


# -- what a value is worth ------------------------------------------------------------------------


def unusable(kind: str, x: np.ndarray) -> np.ndarray:
    """Present values (not NaN) of a coded float64 column that cannot be used: ±inf Gaussian
    values, codes -1 (unseen values), counts that are not whole numbers ≥ 0."""
    with np.errstate(invalid="ignore"):
        if kind == "gaussian":
            return np.isinf(x)
        if kind == "poisson":
            return ~np.isnan(x) & ~((x >= 0) & (x == np.floor(x)) & np.isfinite(x))
        return x == -1


def coded(df: DataFrame, feature: Feature) -> Column:
    """`feature`'s column as a double: Gaussian and count values cast, Bernoulli and categorical
    values replaced by their position in `feature.values` (-1 if not there); null if missing."""
    column = named_column(feature.name)
    missing = column.isNull()
    if isinstance(df.schema[feature.name].dataType, (FloatType, DoubleType)):
        missing = missing | F.isnan(column)
    if feature.kind in ("gaussian", "poisson"):
        return F.when(~missing, column.cast("double"))
    kind = df.schema[feature.name].dataType
    values = F.array(*[F.lit(v).cast(kind) for v in feature.values])
    return F.when(~missing, (F.array_position(values, column) - 1).cast("double"))


def coded_rows(columns: list[np.ndarray], schema: MixedSchema, handle: str):
    """(rows (n, width) float64, keep (n,) bool) from coded columns (NaN for missing): with 'skip'
    a row with any missing or unusable value is not kept; otherwise unusable values become NaN
    and a row with nothing left is not kept."""
    n = len(columns[0]) if columns else 0
    rows = np.empty((n, len(columns)))
    for j, (feature, x) in enumerate(zip(schema.features, columns)):
        rows[:, j] = np.where(unusable(feature.kind, x), np.nan, x)
    observed = ~np.isnan(rows)
    keep = observed.all(axis=1) if handle == "skip" else observed.any(axis=1)
    return rows, keep


def first_problem(columns: list[np.ndarray], schema: MixedSchema) -> np.ndarray:
    """Per row, which column holds its first missing value (code 2j) or unusable value (code
    2j + 1) among coded columns; -1 for a row with neither."""
    codes = np.full(len(columns[0]) if columns else 0, -1)
    for j in reversed(range(len(columns))):
        x = columns[j]
        codes = np.where(unusable(schema.features[j].kind, x), 2 * j + 1, np.where(np.isnan(x), 2 * j, codes))
    return codes


# -- the survey: one pass over the input before packing --------------------------------------------


def _surveyor(features: list[Feature], has_weight: bool, max_levels: int):
    """`mapInArrow` function: per partition, one JSON row of row counts, per-column missing and
    unusable counts (with an example), Gaussian ranges, and up to a bound of distinct values of
    each Bernoulli or categorical column."""

    def survey(batches):
        rows = bad_weights = dropped_skip = dropped_keep = 0
        stats = [{"missing": 0, "bad": 0, "example": None, "min": None, "max": None, "values": set()}
                 for _ in features]
        for batch in batches:
            n = batch.num_rows
            rows += n
            missing_any, usable_any = np.zeros(n, bool), np.zeros(n, bool)
            for j, (feature, s) in enumerate(zip(features, stats)):
                array = batch.column(j)
                missing = array.is_null().to_numpy(zero_copy_only=False)
                if pa.types.is_floating(array.type):
                    missing |= np.isnan(array.to_numpy(zero_copy_only=False))
                bad = np.zeros(n, bool)
                if feature.kind in ("gaussian", "poisson"):
                    x = array.cast(pa.float64()).to_numpy(zero_copy_only=False)
                    bad = ~missing & unusable(feature.kind, x)
                    if bad.any() and s["example"] is None:
                        s["example"] = float(x[bad][0])
                    finite = x[~missing & ~bad]
                    if feature.kind == "gaussian" and finite.size:
                        lo, hi = float(finite.min()), float(finite.max())
                        s["min"] = lo if s["min"] is None else min(s["min"], lo)
                        s["max"] = hi if s["max"] is None else max(s["max"], hi)
                elif len(s["values"]) <= max_levels:
                    present = array.filter(pa.array(~missing))
                    s["values"].update(pc.unique(present).to_pylist())
                s["missing"] += int(missing.sum())
                s["bad"] += int(bad.sum())
                missing_any |= missing | bad
                usable_any |= ~(missing | bad)
            weight_ok = np.ones(n, bool)
            if has_weight:
                w = batch.column(len(features)).to_numpy(zero_copy_only=False).astype(np.float64)
                weight_ok = np.isfinite(w) & (w >= 0)
            bad_weights += int((~weight_ok).sum())
            dropped_skip += int((missing_any | ~weight_ok).sum())
            dropped_keep += int((~usable_any | ~weight_ok).sum())
        for s in stats:
            s["values"] = sorted(s["values"])[: max_levels + 1]
        text = json.dumps({"rows": rows, "badWeights": bad_weights, "droppedSkip": dropped_skip,
                           "droppedKeep": dropped_keep, "columns": stats})
        yield pa.RecordBatch.from_pydict({"survey": pa.array([text], pa.string())})

    return survey


@dataclass
class Survey:
    """The survey of the whole input (partition surveys merged)."""

    rows: int
    bad_weights: int
    dropped_skip: int  # rows 'skip' leaves out (any missing or unusable value, or a bad weight)
    dropped_keep: int  # rows 'keep' leaves out (nothing usable, or a bad weight)
    columns: list[dict]


def survey(df: DataFrame, features: list[Feature], weight: Column | None, max_levels: int) -> Survey:
    """One pass over the input (no shuffle; each partition sends at most `max_levels` + 1 values
    per column)."""
    selected = [named_column(f.name) for f in features] + ([weight.alias("__w")] if weight is not None else [])
    parts = [json.loads(row[0]) for row in df.select(*selected).mapInArrow(
        _surveyor(features, weight is not None, max_levels), "survey string").collect()]
    merged = []
    for j in range(len(features)):
        columns = [p["columns"][j] for p in parts]
        lows = [c["min"] for c in columns if c["min"] is not None]
        highs = [c["max"] for c in columns if c["max"] is not None]
        merged.append({
            "missing": sum(c["missing"] for c in columns),
            "bad": sum(c["bad"] for c in columns),
            "example": next((c["example"] for c in columns if c["example"] is not None), None),
            "min": min(lows) if lows else None,
            "max": max(highs) if highs else None,
            "values": sorted({v for c in columns for v in c["values"]}),
        })
    total = {key: sum(p[key] for p in parts) for key in ("rows", "badWeights", "droppedSkip", "droppedKeep")}
    return Survey(total["rows"], total["badWeights"], total["droppedSkip"], total["droppedKeep"], merged)


def bernoulli_values(name: str, values: list, kind) -> tuple:
    """The (value coded 0, value coded 1) of a Bernoulli column whose distinct values are `values`:
    0/1 or False/True when the values are among those, else its two values in sorted order."""
    natural = (False, True) if isinstance(kind, BooleanType) else (0, 1) if isinstance(kind, NumericType) else None
    if natural is not None and set(values) <= set(natural):
        return natural
    if len(values) != 2:
        shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise InvalidInputError(
            f"bernoulli column '{name}' has {len(values)} distinct value(s) ({shown}); expected 0/1, "
            "a boolean, or exactly two values"
        )
    return tuple(values)


def schema_of(df: DataFrame, features: list[Feature], found: Survey, max_levels: int) -> MixedSchema:
    """The features with their values in code order, and the shift, from the survey."""
    typed, shift = [], np.zeros(len(features))
    for j, (feature, column) in enumerate(zip(features, found.columns)):
        values = ()
        if feature.kind == "bernoulli":
            values = bernoulli_values(feature.name, column["values"], df.schema[feature.name].dataType)
        elif feature.kind == "categorical":
            if len(column["values"]) > max_levels:
                count = df.select(F.countDistinct(named_column(feature.name))).first()[0]
                raise InvalidInputError(
                    f"categorical column '{feature.name}' has {count} levels, more than maxLevels={max_levels} "
                    "(an identifier or a continuous value? model it otherwise, or raise maxLevels)"
                )
            if not column["values"]:
                raise InvalidInputError(f"categorical column '{feature.name}' has no value (all missing)")
            values = tuple(column["values"])
        elif feature.kind == "gaussian" and column["min"] is not None:
            shift[j] = column["min"] / 2 + column["max"] / 2
        typed.append(Feature(feature.name, feature.kind, values))
    return MixedSchema(tuple(typed), shift)


# -- cached blocks ----------------------------------------------------------------------------------


def _packer(schema: MixedSchema, handle: str, has_weight: bool):
    """`mapInArrow` function: coded rows into blocks of `blocks.BLOCK_SCHEMA` (rows that are not
    kept, or have a bad weight, are left out: the survey counted them), and the
    `blocks.content_digest` of the kept rows (one NaN bit pattern) on the partition's last row."""
    width = len(schema.features)

    def pack(batches):
        pid, limit = partition_id(), block_rows_for(width)
        seq, blocker, digest = 0, RowBlocker(has_weight), 0
        for batch in batches:
            columns = [batch.column(j).to_numpy(zero_copy_only=False).astype(np.float64) for j in range(width)]
            rows, keep = coded_rows(columns, schema, handle)
            w = None
            if has_weight:
                w = batch.column(width).to_numpy(zero_copy_only=False).astype(np.float64)
                keep &= np.isfinite(w) & (w >= 0)
                w = w[keep]
            kept = rows[keep]
            digest = (digest + content_digest(np.where(np.isnan(kept), np.nan, kept), w)) % (1 << 64)
            for bx, bw in blocker.add(kept, w, limit):
                yield block_batch(pid, seq, bx, bw, NO_COUNTS, (width, width))
                seq += 1
        for bx, bw in blocker.rest(limit):
            yield block_batch(pid, seq, bx, bw, NO_COUNTS, (width, width))
            seq += 1
        yield block_batch(pid, seq, None, None, NO_COUNTS, (width, width), digest)  # marks the partition

    return pack


class MixedBlockCache(BlockCache):
    """Packed mixed rows in the cached layout of `blocks.BlockCache`, so that its `reduce` (the
    driver engine: partials combined in partition order) runs the latent passes unchanged. Only
    the packing differs: coded columns, NaN kept, and the schema's shift."""

    def __init__(self, df: DataFrame, schema: MixedSchema, weight: Column | None, handle: str,
                 aggregation_depth: int = 2):
        # The attributes `BlockCache.reduce` reads, set here: its __init__ would pack vectors.
        self.has_weight, self.aggregation_depth, self.session = weight is not None, aggregation_depth, df.sparkSession
        selected = [coded(df, f) for f in schema.features] + ([weight.alias("__w")] if self.has_weight else [])
        self.blocks = (
            df.select(*selected)
            .mapInArrow(_packer(schema, handle, self.has_weight), BLOCK_SCHEMA)
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        self.shift = schema.shift
        self.dtype = np.float64
        self.partitions = 0

    def summarize(self) -> "PackedSummary":
        """Materialise the cache and describe it."""
        t = self.blocks.select("pid", "n", "wsum", "digest").toArrow()
        self.partitions = int(t.column("pid").to_numpy().max()) + 1 if len(t) else 0
        content = int(t.column("digest").to_numpy().view(np.uint64).sum(dtype=np.uint64))
        return PackedSummary(int(t.column("n").to_numpy().sum()), float(t.column("wsum").to_numpy().sum()),
                             len(self.shift), self.partitions, f"{content:016x}")


@dataclass(frozen=True)
class PackedSummary:
    """The cached mixed rows as the engines (`engine_choice`, `barrier`) and checkpoints see them."""

    rows: int
    total_weight: float  # of the rows kept
    d: int  # packed values per row
    partitions: int
    content: str  # 16 hex digits: `blocks.content_digest` of the kept rows, whatever their order
