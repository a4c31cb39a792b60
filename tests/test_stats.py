"""Error bars: bootstrap intervals cover the mean and shrink with more questions; paired tests tell a real
difference from a coin toss."""

import pytest

from steper_dspy.evals.stats import bootstrap_interval, mcnemar_p, paired_bootstrap_p


def test_the_bootstrap_interval_brackets_the_mean_and_narrows_with_more_questions():
    few = [1.0, 0.0] * 10
    many = [1.0, 0.0] * 200
    low, high = bootstrap_interval(few)
    assert low < 0.5 < high
    wide, narrow = high - low, bootstrap_interval(many)[1] - bootstrap_interval(many)[0]
    assert narrow < wide / 3  # about 1/sqrt(20): 20 times the questions
    assert bootstrap_interval([1.0] * 30) == (1.0, 1.0)
    assert bootstrap_interval(few, seed=3) == bootstrap_interval(few, seed=3)  # seeded


def test_paired_tests_find_a_consistent_difference_and_not_a_coin_toss():
    better = [1.0] * 30 + [0.0] * 10
    worse = [0.0] * 30 + [0.0] * 10
    assert paired_bootstrap_p(better, worse) < 0.01
    assert mcnemar_p([x > 0 for x in better], [x > 0 for x in worse]) < 0.01
    same = [1.0, 0.0] * 20
    assert paired_bootstrap_p(same, same) == 1.0 and mcnemar_p(same, same) == 1.0
    one_question = [1.0] + [0.0] * 39
    assert paired_bootstrap_p(one_question, [0.0] * 40) > 0.2  # one question apart is not a difference
    assert mcnemar_p([True] + [False] * 39, [False] * 40) == 1.0
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap_p([1.0], [1.0, 0.0])
