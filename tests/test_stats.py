"""Paired bootstrap over sufficient statistics: exact corpus metrics, honest intervals, seeded."""

import numpy as np
import pytest

from instructune.evaluate.metrics import compute_metrics, metric_statistics
from instructune.evaluate.stats import compare, paired_bootstrap

CASES = {
    "classification": (["billing", "Delivery.", "nonsense", "account", "billing"],
                       ["billing", "delivery", "account", "account", "technical"], ["billing", "delivery", "account", "technical"]),
    "summarization": (["the server went down", "disk was full on db"], ["the web server went down for an hour", "the db disk filled"], None),
    "translation": (["le chat est sur le tapis", "bonjour à tous", "il pleut"],
                    ["le chat est sur la natte", "bonjour tout le monde", "il pleut beaucoup"], None),
    "qa": (["Paris", "in 1999", "Bob"], ["Paris, France", "1999", "Alice"], None),
    "ner": (["Maria: person, Lisbon: location", "none", "Acme: organization"],
            ["Maria: person, Lisbon: location, Acme: organization", "none", "Acme: location"], None),
}


@pytest.mark.parametrize("task_type", list(CASES))
def test_sufficient_statistics_reproduce_corpus_metrics(task_type):
    preds, refs, choices = CASES[task_type]
    metrics, _ = compute_metrics(task_type, preds, refs, choices)
    for name, (stats, finish) in metric_statistics(task_type, preds, refs, choices).items():
        assert finish(stats.sum(0, keepdims=True))[0] == pytest.approx(metrics[name], abs=1e-12), name


def test_certain_gain_has_a_tight_interval_and_small_p():
    r = paired_bootstrap([0.0] * 30, [1.0] * 30, resamples=1000)
    assert (r["difference"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0)
    assert r["p_value"] == pytest.approx(1 / 1000) and r["significant"]


def test_no_difference_is_not_significant():
    rng = np.random.default_rng(1)
    scores = rng.random(50)
    r = paired_bootstrap(scores, scores)
    assert r["difference"] == 0 and r["ci_low"] == 0 == r["ci_high"] and r["p_value"] == 1.0 and not r["significant"]
    noisy = paired_bootstrap(scores, scores + rng.normal(0, 0.2, 50))
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and not noisy["significant"]


def test_interval_matches_the_textbook_bootstrap():
    # the same distribution as resampling indices and averaging, within Monte Carlo error
    rng = np.random.default_rng(0)
    base, tuned = rng.integers(0, 2, 80).astype(float), rng.integers(0, 2, 80).astype(float)
    idx = rng.integers(0, 80, size=(20000, 80))
    naive = np.quantile(tuned[idx].mean(1) - base[idx].mean(1), [0.025, 0.975])
    r = paired_bootstrap(base, tuned, resamples=20000, seed=3)
    assert r["ci_low"] == pytest.approx(naive[0], abs=0.02) and r["ci_high"] == pytest.approx(naive[1], abs=0.02)


def test_compare_is_seeded_and_covers_every_metric():
    preds, refs, _ = CASES["translation"]
    a = compare("translation", ["x"] * 3, preds, refs, resamples=300, seed=5)
    b = compare("translation", ["x"] * 3, preds, refs, resamples=300, seed=5)
    assert a == b and set(a) == {"bleu", "chrf"}
    assert a["chrf"]["difference"] > 0
