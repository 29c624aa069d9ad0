"""The compiled, fused E-step (`spark_gmm.fused`) against the numpy kernels it replaces (the
reference in `spark_gmm.kernels`), and the switch between them."""

import subprocess
import sys

import numpy as np
import pytest

from spark_gmm import fused, kernels
from spark_gmm.mixture import ComponentStatistics, Mixture

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def random_mixture(rng, k, d, covariance_type, spread=3.0):
    """k components in d dimensions whose covariances have the structure of `covariance_type`."""
    a = rng.normal(size=(k, d, d))
    full = a @ np.swapaxes(a, 1, 2) / d + 0.3 * np.eye(d)
    covariances = {
        "full": full,
        "diag": full * np.eye(d),
        "spherical": rng.uniform(0.5, 2.0, size=(k, 1, 1)) * np.eye(d),
        "tied": np.broadcast_to(full[0], (k, d, d)),
    }[covariance_type]
    return Mixture.from_covariances(rng.uniform(0.2, 1.0, size=k), rng.normal(0, spread, (k, d)), covariances)


def rows_of(rng, mixture, n):
    pick = rng.integers(0, mixture.k, size=n)
    return mixture.means[pick] + rng.normal(size=(n, mixture.d)) * 1.5


def reference(x, w, mixture):
    """The numpy kernels' statistics, second moments formed around the centres (no cancellation)."""
    log_norm, resp = kernels.normalize_log(kernels.weighted_log_joint(x, mixture))
    ll = float(log_norm.sum() if w is None else w @ log_norm)
    return kernels.moment_statistics(x, w, resp, mixture.means, ll, around_centers=True)


def assert_statistics_close(ours, theirs, k, d, rtol, total_weight):
    """Each statistic within `rtol` of its own scale: Σγ of the total weight, first moments of
    √(Σγ·Σγ(x−μ)²), second moments of √(S_aa·S_bb); hard counts exactly."""
    a, b = ComponentStatistics.unpack(ours, k, d), ComponentStatistics.unpack(theirs, k, d)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=rtol, atol=rtol * total_weight)
    np.testing.assert_allclose(a.resp, b.resp, rtol=0, atol=rtol * total_weight)
    np.testing.assert_array_equal(a.hard_counts, b.hard_counts)
    rows, cols = np.triu_indices(d)
    diagonal = b.second[:, rows == cols]
    first_scale = np.sqrt(b.resp[:, None] * diagonal) + 1e-300
    np.testing.assert_array_less(np.abs(a.first - b.first), rtol * first_scale + 1e-300)
    second_scale = np.sqrt(diagonal[:, rows] * diagonal[:, cols]) + 1e-300
    np.testing.assert_array_less(np.abs(a.second - b.second), rtol * second_scale + 1e-300)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k, d", [(1, 1), (1, 5), (3, 1), (4, 2), (5, 7), (3, 30)])
def test_float64_statistics_match_the_numpy_kernels(rng, covariance_type, weighted, k, d):
    mixture = random_mixture(rng, k, d, covariance_type)
    n = 1000 + int(rng.integers(0, 300))  # several tiles and a partial one
    x = rows_of(rng, mixture, n)
    w = rng.uniform(0, 3, size=n) if weighted else None
    ours = fused.statistics(x, None, w, mixture)
    total = float(n if w is None else w.sum())
    assert_statistics_close(ours, reference(x, w, mixture), k, d, 1e-12, total)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_blocks_are_widened_before_any_arithmetic(rng, covariance_type):
    mixture = random_mixture(rng, 4, 6, covariance_type)
    x = rows_of(rng, mixture, 700).astype(np.float32)
    w = rng.uniform(0, 2, size=700)
    narrow = fused.statistics(x, None, w, mixture)
    np.testing.assert_array_equal(narrow, fused.statistics(x.astype(np.float64), None, w, mixture))
    # The numpy kernel forms the Mahalanobis terms in float32: agreement to float32's round-off.
    assert_statistics_close(narrow, reference(x, w, mixture), 4, 6, 1e-5, w.sum())


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_the_shift_subtracted_in_the_kernel_gives_the_bits_of_a_shifted_copy(rng, covariance_type):
    """The engines hand the kernel raw rows and the data shift: the statistics are those of the
    shifted rows, bit for bit, also for rows far from the origin and for float32 rows."""
    mixture = random_mixture(rng, 5, 7, covariance_type)
    shift = rng.normal(0, 1e7, size=7)
    raw = rows_of(rng, mixture, 1300) + shift
    w = rng.uniform(0, 2, size=1300)
    for weights in (None, w):
        np.testing.assert_array_equal(
            fused.statistics(raw, shift, weights, mixture), fused.statistics(raw - shift, None, weights, mixture)
        )
    narrow = raw.astype(np.float32)
    np.testing.assert_array_equal(
        fused.statistics(narrow, shift, w, mixture), fused.statistics(narrow.astype(np.float64) - shift, None, w, mixture)
    )


def test_an_empty_block_adds_nothing(rng):
    mixture = random_mixture(rng, 3, 4, "full")
    for x in (np.empty((0, 4)), np.empty((0, 4), dtype=np.float32)):
        out = fused.statistics(x, None, None, mixture)
        assert out.shape == (ComponentStatistics.size(3, 4),)
        assert not out.any()
        log_density, resp = fused.posterior(x, mixture)
        assert log_density.shape == (0,) and resp.shape == (0, 3)


def test_rows_whose_densities_all_underflow(rng):
    """Rows hundreds of standard deviations from every component: each density underflows, the
    log-likelihood and the responsibilities do not."""
    mixture = random_mixture(rng, 3, 4, "full", spread=1.0)
    x = np.concatenate([rows_of(rng, mixture, 200), rng.normal(0, 1, (50, 4)) + 400.0, [[-900.0, 0, 0, 0]]])
    assert (np.exp(kernels.weighted_log_joint(x[200:], mixture)) == 0).all()
    ours = fused.statistics(x, None, None, mixture)
    assert np.isfinite(ours).all()
    assert_statistics_close(ours, reference(x, None, mixture), 3, 4, 1e-12, len(x))
    log_density, resp = fused.posterior(x, mixture)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(log_density, kernels.normalize_log(kernels.weighted_log_joint(x, mixture))[0], rtol=1e-13)


def test_a_component_far_below_the_others_gets_exactly_zero(rng):
    """exp(x) below the floor (x < -708) is 0: a negligible component gets no mass, as in numpy."""
    mixture = Mixture.from_covariances([0.5, 0.5], [[0.0], [60.0]], np.ones((2, 1, 1)) * 0.5)
    x = rng.normal(0, 0.5, size=(300, 1))  # (60/√0.5)² / 2 = 3600 nats below the first component
    stats = ComponentStatistics.unpack(fused.statistics(x, None, None, mixture), 2, 1)
    assert stats.resp[1] == 0.0 and stats.hard_counts[1] == 0
    assert_statistics_close(fused.statistics(x, None, None, mixture), reference(x, None, mixture), 2, 1, 1e-12, 300)


@pytest.mark.parametrize("k, d", [(1, 1), (5, 3), (8, 16)])
def test_posterior_matches_the_numpy_kernels(rng, k, d):
    mixture = random_mixture(rng, k, d, "full")
    x = rows_of(rng, mixture, 900)
    log_density, resp = fused.posterior(x, mixture)
    expected_density, expected_resp = kernels.normalize_log(kernels.weighted_log_joint(x, mixture))
    np.testing.assert_allclose(log_density, expected_density, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(resp, expected_resp, rtol=1e-11, atol=1e-14)


def test_exp_agrees_with_libm_and_flushes_below_the_floor():
    values = np.concatenate([-np.logspace(-12, np.log10(745.0), 5000), [0.0, -0.0, -708.0, -708.5, -1e300]])
    out = values.copy()
    scale = np.empty(len(out))
    fused.exp_nonpositive(out, len(out), scale, scale.view(np.int64))
    expected = np.where(values >= fused.EXP_FLOOR, np.exp(values), 0.0)
    assert (np.abs(out - expected) <= 2 * np.spacing(expected)).all()
    assert out[values < fused.EXP_FLOOR].max() == 0.0


def test_same_block_same_bits_and_diagonal_shortcut_is_exact(rng):
    mixture = random_mixture(rng, 4, 9, "diag")
    x = rows_of(rng, mixture, 2000)
    w = rng.uniform(0, 2, size=2000)
    first = fused.statistics(x, None, w, mixture)
    np.testing.assert_array_equal(first, fused.statistics(x.copy(), None, w.copy(), mixture))
    consts, means, prec, diagonal = fused._parameters(mixture)
    assert diagonal
    general = np.zeros_like(first)
    fused._estep(x, np.zeros(9), w, consts, means, prec, False, False, fused.TILE_ROWS, general)
    np.testing.assert_array_equal(first, general)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k, d", [(1, 1), (3, 2), (4, 9), (2, 30)])
def test_diagonal_moments_are_the_diagonal_of_the_full_ones(rng, weighted, k, d):
    """What diag and spherical fits gather: the diagonal of the full second moments, nothing off
    it; the rest of the statistics bit for bit the same. Compiled, in float32 too, and numpy."""
    mixture = random_mixture(rng, k, d, "diag")
    x = rows_of(rng, mixture, 1100)
    w = rng.uniform(0, 2, size=1100) if weighted else None
    rows, cols = np.triu_indices(d)
    for block in (x, x.astype(np.float32)):
        full = ComponentStatistics.unpack(fused.statistics(block, None, w, mixture), k, d)
        diagonal = ComponentStatistics.unpack(fused.statistics(block, None, w, mixture, True), k, d)
        assert not diagonal.second[:, rows != cols].any()
        np.testing.assert_allclose(diagonal.second[:, rows == cols], full.second[:, rows == cols], rtol=1e-13)
        for name in ("log_likelihood", "resp", "hard_counts", "first"):
            np.testing.assert_array_equal(getattr(diagonal, name), getattr(full, name))
    log_norm, resp = kernels.normalize_log(kernels.weighted_log_joint(x, mixture))
    ll = float(log_norm.sum() if w is None else w @ log_norm)
    numpy = kernels.moment_statistics(x, w, resp, mixture.means, ll, diagonal=True)
    total = float(1100 if w is None else w.sum())
    assert_statistics_close(fused.statistics(x, None, w, mixture, True), numpy, k, d, 1e-12, total)
    assert not ComponentStatistics.unpack(numpy, k, d).second[:, rows != cols].any()


def test_estep_pass_runs_the_compiled_kernel_and_numpy_without_numba(rng, monkeypatch):
    mixtures = [random_mixture(rng, 3, 4, "full"), random_mixture(rng, 2, 4, "tied"), random_mixture(rng, 2, 4, "diag")]
    x = rows_of(rng, mixtures[0], 500)
    estep = kernels.EStepPass(mixtures, [False, False, True])
    compiled = estep.map_block(x, None, None)
    np.testing.assert_array_equal(compiled, np.concatenate(
        [fused.statistics(x, None, None, m, diagonal) for m, diagonal in zip(mixtures, [False, False, True])]
    ))
    monkeypatch.setattr(kernels, "fused", None)
    np.testing.assert_array_equal(estep.map_block(x, None, None), estep.reference_statistics(x, None))
    log_density, resp = kernels.posterior(x, mixtures[0])
    expected = kernels.normalize_log(kernels.weighted_log_joint(x, mixtures[0]))
    np.testing.assert_array_equal(log_density, expected[0])
    np.testing.assert_array_equal(resp, expected[1])


def test_only_diagonal_covariance_types_gather_diagonal_moments(rng):
    from spark_gmm import em, families

    mixture = random_mixture(rng, 2, 3, "diag")
    settings = [em.FitSettings(k=2, max_iter=1, tol=0.0, reg_covar=1e-6, seed=0, covariance_type=t)
                for t in COVARIANCE_TYPES]
    assert families.GaussianFamily().estep_pass([mixture] * 4, settings).diagonal == [False, True, True, False]


def test_without_numba_the_import_warns_and_scores_with_numpy():
    code = (
        "import sys, warnings\n"
        "sys.modules['numba'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from spark_gmm import kernels\n"
        "assert kernels.fused is None\n"
        "print([str(w.message).splitlines()[0] for w in caught if w.category is RuntimeWarning])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "numba cannot be imported" in result.stdout


def test_shipped_as_a_zip_without_a_writable_cache_it_compiles_in_memory(tmp_path):
    """`--py-files spark_gmm.zip` on an executor whose cache directory cannot be written: numba's
    zip cache would fail on the first call; the kernel is compiled without the disk cache instead."""
    import shutil
    from pathlib import Path

    package = Path(fused.__file__).parent
    archive = shutil.make_archive(str(tmp_path / "spark_gmm"), "zip", package.parent, package.name)
    code = (
        "import numpy as np\n"
        "from spark_gmm import fused\n"
        "values, scale = np.array([0.0, -1.0]), np.empty(2)\n"  # the smallest kernel: quick to compile
        "fused.exp_nonpositive(values, 2, scale, scale.view(np.int64))\n"
        "print(fused.__file__, fused.CACHE, values.round(6).tolist())\n"
    )
    unusable = "/dev/null/cache"  # a path under a file: no directory can be made there
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": archive, "HOME": unusable, "XDG_CACHE_HOME": unusable}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    location, cache, values = result.stdout.split(" ", 2)
    assert location.startswith(archive) and cache == "False"
    assert values.strip() == "[1.0, 0.367879]"


def test_zipped_kernels_are_cached_by_content_not_by_the_zips_path(tmp_path):
    """Spark copies a `--py-files` zip into each application's directory: a second copy of the same
    zip at another path loads the kernel the first one compiled, from NUMBA_CACHE_DIR when set."""
    import shutil
    from pathlib import Path

    package = Path(fused.__file__).parent
    first = shutil.make_archive(str(tmp_path / "app1" / "spark_gmm"), "zip", package.parent, package.name)
    second = tmp_path / "app2" / "spark_gmm.zip"
    second.parent.mkdir()
    shutil.copy(first, second)
    code = (
        "import numpy as np\n"
        "from spark_gmm import fused\n"
        "values, scale = np.array([0.0, -1.0]), np.empty(2)\n"
        "fused.exp_nonpositive(values, 2, scale, scale.view(np.int64))\n"
        "stats = fused.exp_nonpositive.stats\n"
        "print(fused.__file__, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), stats.cache_path)\n"
    )
    cache, unusable = tmp_path / "numba-cache", "/dev/null/home"  # the home cannot hold a cache
    runs = []
    for archive in (first, second):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(archive), "HOME": unusable, "XDG_CACHE_HOME": unusable,
               "NUMBA_CACHE_DIR": str(cache)}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
        )
        runs.append(result.stdout.split())
    (location1, hits1, misses1, path1), (location2, hits2, misses2, path2) = runs
    assert location1.startswith(str(first)) and location2.startswith(str(second))
    assert (hits1, misses1) == ("0", "1") and (hits2, misses2) == ("1", "0")
    assert path1 == path2 and Path(path1).parent == cache and Path(path1).name.startswith("spark_gmm-fused-")
