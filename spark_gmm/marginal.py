"""`GaussianMixture` with missing values marginalised (handleInvalid='keep'). No Spark here.

A Gaussian mixture is the latent class model with one Gaussian block and nothing else, so its
exact EM over rows with missing coordinates (NaN) is `latent`'s: the likelihood of each row's
observed coordinates, the missing ones completed by their conditional expectations, rows grouped
by missingness pattern. Only the start is the Gaussian one: `settings.start` (an initial model)
or `initMode` (k-means|| by default) run over the rows with no missing value — the start a fit of
those rows alone gets; with fewer such rows than k, EM starts from random responsibilities over
all rows (`latent.LatentFamily`'s start).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from . import em
from .initialisation import initial_mixture_steps, run_passes
from .latent import Columns, LatentClassModel, LatentFamily

log = logging.getLogger("spark_gmm")


class CompleteRowsPass:
    """The pass `inner` over the rows of each block that have no missing value."""

    def __init__(self, inner):
        self.inner = inner
        self.label = f"{inner.label}, rows without missing values"
        self.partial_bytes = getattr(inner, "partial_bytes", 0)

    def map_block(self, raw, shift, w):
        keep = ~np.isnan(raw).any(axis=1)
        return self.inner.map_block(raw[keep], shift, None if w is None else w[keep])

    def combine(self, a, b):
        return self.inner.combine(a, b)


def complete_rows(reduce: em.Reduce) -> em.Reduce:
    """A `reduce` over the rows of `reduce`'s blocks that have no missing value."""
    return lambda pass_: reduce(CompleteRowsPass(pass_))


def latent_start(mixture, k: int, covariance_type: str) -> LatentClassModel:
    """The latent class model whose only block is the Gaussian mixture `mixture`."""
    return LatentClassModel(mixture.weights, mixture, covariance_type, np.zeros((k, 0)), (), np.zeros((k, 0)))


def latent_settings(settings: em.FitSettings, d: int, start=None) -> em.FitSettings:
    """The Gaussian `settings` as the latent class fit that marginalises (NaN blocks stay float64)."""
    return replace(settings, family=LatentFamily(Columns(d, 0, 0, 0)), start=start, dtype="float64")


def fit(reduce: em.Reduce, d: int, total_weight: float, candidates: list[em.FitSettings], complete: int,
        describe=None, resume: em.EMState | None = None, on_state=None) -> list[em.FitResult]:
    """`em.fit` of each candidate (Gaussian settings, shifted coordinates) over rows whose missing
    values are NaN; `total_weight` is the rows' (each has an observed value), `complete` the count
    of rows with none missing. A single candidate may `resume` a checkpointed state (of
    `latent_settings`) and report each state to `on_state`. Each result's `mixture` is a
    `mixture.Mixture`, as the Gaussian fit's."""
    gaussian = [i for i, c in enumerate(candidates) if c.start is None and complete >= c.k and resume is None]
    if gaussian:
        log.info("initialisation over the %d rows without missing values", complete)
    starts = dict(zip(gaussian, run_passes(
        complete_rows(reduce), [initial_mixture_steps(d, candidates[i]) for i in gaussian], describe)))
    latent = []
    for i, c in enumerate(candidates):
        start = starts.get(i, c.start)
        if start is None and resume is None:
            log.info("%d rows without missing values, fewer than k=%d: EM starts from random responsibilities",
                     complete, c.k)
        latent.append(latent_settings(c, d, None if start is None else latent_start(start, c.k, c.covariance_type)))
    results = em.fit(reduce, d, total_weight, latent, resume=resume, on_state=on_state, describe=describe)
    return [replace(r, mixture=r.mixture.gaussian) for r in results]
