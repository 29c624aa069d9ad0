"""The input columns of a job: a Gaussian fit's features, a saved model (Gaussian or mixed) set to
score an input's columns, and the output columns' names checked against the input's."""

from __future__ import annotations

from spark_gmm.inputs import named_column

from . import mixed
from .errors import JobError, short_message
from .storage import read_input


def resolve_features(df, names: list[str]) -> dict:
    """Estimator params for the feature columns: {'inputCols': [...]} or {'featuresCol': name}."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, NumericType

    fields = {f.name: f.dataType for f in df.schema.fields}
    missing = [n for n in names if n not in fields]
    if missing:
        what = "column" if len(missing) == 1 else "columns"
        raise JobError(
            f"feature {what} {', '.join(repr(m) for m in missing)} not found in the input; "
            f"available columns: {', '.join(fields) or '(none)'}"
        )
    if len(names) == 1:
        kind = fields[names[0]]
        if isinstance(kind, VectorUDT) or (isinstance(kind, ArrayType) and isinstance(kind.elementType, NumericType)):
            return {"featuresCol": names[0]}
        if isinstance(kind, NumericType):
            return {"inputCols": names}
        raise JobError(
            f"feature column '{names[0]}' has type {kind.simpleString()}; --features needs numeric "
            "columns or one vector / numeric-array column"
        )
    wrong = [f"'{n}' ({fields[n].simpleString()})" for n in names if not isinstance(fields[n], NumericType)]
    if wrong:
        raise JobError(f"feature columns must be numeric: {', '.join(wrong)}")
    return {"inputCols": names}


def model_features(model, df, names: list[str] | None) -> dict:
    """Estimator-style feature params for scoring `df` with `model`, checked against the model."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F

    if names is None:  # the columns the model was fitted on
        names = model.getInputCols() if model.isDefined(model.inputCols) else [model.getFeaturesCol()]
    features = resolve_features(df, names)
    if "inputCols" in features:
        count = len(features["inputCols"])
    else:
        column = named_column(features['featuresCol'])
        if isinstance(df.schema[features["featuresCol"]].dataType, VectorUDT):
            column = vector_to_array(column)
        first = df.where(column.isNotNull()).select(F.size(column)).first()
        count = first[0] if first else model.numFeatures
    if count != model.numFeatures:
        raise JobError(f"the model has {model.numFeatures} features but --features {', '.join(names)} gives {count}")
    return features


def check_output_columns(args, input_columns: list[str]) -> None:
    """The columns the predictions add must not clash with the input's; --partition-by must exist."""
    if not getattr(args, "predictions_out", None):
        return
    added = [args.prediction_col, args.probability_col, args.log_likelihood_col]
    clash = [c for c in added if c and c in input_columns]
    if clash:
        raise JobError(
            f"the input already has a column named '{clash[0]}'; choose another name with "
            "--prediction-col / --probability-col / --log-likelihood-col"
        )
    missing = [c for c in args.partition_by or [] if c not in input_columns]
    if missing:
        raise JobError(f"--partition-by column '{missing[0]}' is not in the input")


def is_mixed(model) -> bool:
    from spark_gmm import MixedMixtureModel

    return isinstance(model, MixedMixtureModel)


def saved_model_on(spark, args):
    """(saved model set to score `args.input`'s features, input DataFrame, 'path' or 'table')."""
    from spark_gmm import GaussianMixtureModel, MixedMixtureModel, ModelFormatError, persistence

    try:
        saved = persistence.saved_class(args.model)
        model = (MixedMixtureModel if saved == "spark_gmm.MixedMixtureModel" else GaussianMixtureModel).load(args.model)
    except ModelFormatError as error:
        raise JobError(short_message(error)) from None
    df, kind = read_input(spark, args.input, args.format)
    if is_mixed(model):
        mixed.check_model_columns(model, df, args.features)
        return model, df, kind
    features = model_features(model, df, args.features)
    model = model.copy()
    if "inputCols" in features:
        model.setInputCols(features["inputCols"])
    else:
        model.clear(model.inputCols)
        model.setFeaturesCol(features["featuresCol"])
    return model, df, kind
