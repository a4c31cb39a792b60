"""Answer metrics on hand-computed cases: normalisation, aliases, containment, missing answers."""

import dspy
import pytest

from steper_dspy.metrics import METRICS, answer_accuracy, answer_exact_match, answer_f1


def ex(answer, aliases=None) -> dspy.Example:
    fields = {"question": "q?", "answer": answer}
    if aliases is not None:
        fields["answer_aliases"] = aliases
    return dspy.Example(**fields).with_inputs("question")


def pred(answer) -> dspy.Prediction:
    return dspy.Prediction(answer=answer)


@pytest.mark.parametrize(
    ("gold", "predicted", "em", "f1", "accuracy"),
    [
        ("Eiffel Tower", "The Eiffel Tower!", True, 1.0, True),
        ("Paris", "Eiffel Tower is in Paris", False, 1 / 3, True),  # P = 1/5, R = 1, F1 = 2PR / (P + R)
        ("Paris", "Paris, France", False, 2 / 3, True),  # P = 1/2, R = 1
        ("New York City", "New York", False, 0.8, False),  # P = 1, R = 2/3
        ("1962", "19621", False, 0.0, False),  # containment is on whole tokens
        ("no", "it is not known", False, 0.0, False),
        ("Rush", "rush", True, 1.0, True),
        ("Rush", "", False, 0.0, False),
    ],
)
def test_hand_computed_cases(gold, predicted, em, f1, accuracy):
    example, prediction = ex(gold), pred(predicted)
    assert answer_exact_match(example, prediction) is em
    assert answer_f1(example, prediction) == pytest.approx(f1)
    assert answer_accuracy(example, prediction) is accuracy


def test_aliases_count_and_the_best_score_wins():
    example = ex("United States of America", aliases=["USA", "United States"])
    assert answer_exact_match(example, pred("usa"))
    assert answer_f1(example, pred("the United States")) == pytest.approx(1.0)
    assert answer_accuracy(example, pred("He moved to the USA in 1990."))
    assert not answer_exact_match(example, pred("Canada"))


def test_empty_aliases_and_list_answers():
    assert not answer_accuracy(ex("Rush", aliases=["", "  "]), pred("anything at all"))
    assert answer_exact_match(ex(["Rush", "Rush (band)"]), pred("rush band"))


@pytest.mark.parametrize("prediction", [pred(None), dspy.Prediction(rationale="no answer field"), None, object()])
def test_missing_answers_score_zero_without_raising(prediction):
    example = ex("Rush")
    assert answer_exact_match(example, prediction) is False
    assert answer_f1(example, prediction) == 0.0
    assert answer_accuracy(example, prediction) is False


def test_non_string_answers_are_compared_as_text():
    assert answer_exact_match(ex("1962"), pred(1962))
    assert answer_accuracy(ex("1962"), pred(1962))


def test_metric_protocol_and_registry():
    example, prediction = ex("Rush"), pred("Rush")
    assert set(METRICS) == {"em", "f1", "accuracy"}
    for metric in METRICS.values():
        assert metric(example, prediction) == metric(example, prediction, trace=[("step", {}, prediction)]) == 1
    assert isinstance(answer_f1(example, pred("nothing")), float)
