import pytest
from transformers import AutoTokenizer

from steper_dspy.errors import SteperError
from steper_dspy.lm.chat import chat_prompt_ids
from steper_dspy.training.config import TrainingConfig
from steper_dspy.training.data import (
    StageCollator,
    build_training_data,
    data_hash,
    tokenize_sample,
    validate_samples,
)
from steper_dspy.training.packing import ancestor_mask, linear_feature, pack_steps

TARGET = "[[ ## rationale ## ]]\nSo the answer is: Paris.\n\n[[ ## completed ## ]]"


def _sample(stage="init", question="Who was born in which city?", target=TARGET):
    return {
        "messages": [
            {"role": "system", "content": "Your input fields are: question, passages."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": target},
        ],
        "stage": stage,
        "step": 0,
        "example_id": "q1",
        "score": 1.0,
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_mask_exactly_the_prompt_and_the_rest_decodes_to_target_and_eos(tokenizer):
    sample = _sample()
    encoded = tokenize_sample(tokenizer, sample)
    prompt = chat_prompt_ids(tokenizer, sample["messages"][:-1])
    labels, ids = encoded["labels"], encoded["input_ids"]
    assert len(labels) == len(ids)
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert all(label != -100 for label in labels[len(prompt) :])
    target = [label for label in labels if label != -100]
    assert target == ids[len(prompt) :]
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target) == TARGET + tokenizer.eos_token


def test_prompt_ids_equal_the_inference_chat_template(tokenizer):
    sample = _sample()
    encoded = tokenize_sample(tokenizer, sample)
    inference = tokenizer.apply_chat_template(
        sample["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert encoded["input_ids"][: len(inference)] == list(inference)
    assert encoded["labels"][len(inference) - 1] == -100
    assert encoded["labels"][len(inference)] != -100
    assert tokenizer.decode(inference).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        ({"stage": "init"}, "messages"),
        ({"messages": _sample()["messages"]}, "stage"),
        ({**_sample(), "stage": "conclude"}, "stage"),
        ({**_sample(), "messages": _sample()["messages"][:2]}, "assistant"),
        ({**_sample(), "messages": _sample()["messages"][::-1]}, "end with the assistant"),
        ({**_sample(), "messages": [{"role": "user"}, *_sample()["messages"][1:]]}, "messages[0]"),
    ],
)
def test_bad_samples_raise_naming_index_and_field(broken, field):
    with pytest.raises(SteperError) as error:
        validate_samples([_sample(), broken])
    assert "Sample 1" in str(error.value)
    assert field in str(error.value)


def test_stage_filter_keeps_only_the_configured_stages(tokenizer):
    stages = ("init", "expand", "aggregate", "expand", "init")
    samples = validate_samples([_sample(s, question=f"Who was born in city {i}?") for i, s in enumerate(stages)])
    data = build_training_data(samples, tokenizer, ("init", "aggregate"), max_length=1024, pack=False)
    assert data.num_samples == {"init": 2, "aggregate": 1}
    assert data.skipped == {"expand": 2}
    assert [max(f["label_stages"]) for f in data.features] == [0, 1, 0]
    assert all(f["length"] == len(f["input_ids"]) for f in data.features)
    packed = build_training_data(samples, tokenizer, ("init", "aggregate"), max_length=1024)
    assert len(packed.features) == 1 and packed.num_samples == data.num_samples  # one chain (example q1)
    assert sorted(set(packed.features[0]["label_stages"]) - {-1}) == [0, 1]


def test_samples_longer_than_max_length_are_dropped_and_counted(tokenizer):
    samples = validate_samples([_sample("init"), _sample("expand", question="Who? " * 200)])
    longest = max(len(tokenize_sample(tokenizer, s)["input_ids"]) for s in samples)
    shortest = min(len(tokenize_sample(tokenizer, s)["input_ids"]) for s in samples)
    data = build_training_data(samples, tokenizer, ("init", "expand"), max_length=longest - 1)
    assert data.num_samples == {"init": 1, "expand": 0}
    assert data.dropped == {"expand": 1}
    with pytest.raises(SteperError, match="max_length"):
        build_training_data(samples, tokenizer, ("init", "expand"), max_length=shortest - 1)


def test_data_hash_is_stable_and_content_sensitive():
    samples = [_sample("init"), _sample("expand")]
    assert data_hash(samples) == data_hash([dict(reversed(list(s.items()))) for s in samples])
    assert data_hash(samples) != data_hash(samples[::-1])
    assert data_hash(samples) != data_hash([_sample("init"), _sample("expand", target="other")])


def test_collator_left_pads_and_carries_shifted_labels_and_their_stages():
    features = [linear_feature([5, 6, 7], [-100, 6, 7], 2), linear_feature([8, 9], [-100, 9], 0)]
    batch = StageCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert batch["labels"].tolist() == [[6, 7, -100], [-100, 9, -100]]  # the id each position predicts
    assert batch["label_stages"].tolist() == [[2, 2, -1], [-1, 0, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert int(batch["num_tokens"]) == 5
    padded = StageCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    assert padded["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]


def test_a_chain_packs_its_shared_prompt_prefix_once():
    # Three steps whose prompts share [1, 2, 3]; the second and third share [1, 2, 3, 4, 5] as well.
    steps = [
        ([1, 2, 3, 9, 50, 51], [-100] * 4 + [50, 51], 0),
        ([1, 2, 3, 4, 5, 8, 60], [-100] * 6 + [60], 1),
        ([1, 2, 3, 4, 5, 6, 7, 70, 71], [-100] * 7 + [70, 71], 2),
    ]
    packed = pack_steps(steps)
    assert packed["length"] == 14 < packed["sample_tokens"] == 22
    # Each step's tokens, followed through the parents from its last token, are its own ids in order.
    paths = [_path(packed, i) for i in range(packed["length"])]
    assert all(input_ids in paths for input_ids, _, _ in steps)
    # Every target is predicted exactly once, from the last positions, with its step's stage.
    predicted = [
        (label, stage) for label, stage in zip(packed["labels"], packed["label_stages"], strict=True) if label != -100
    ]
    assert sorted(predicted) == [(50, 0), (51, 0), (60, 1), (70, 2), (71, 2)]
    first_predicting = min(i for i, label in enumerate(packed["labels"]) if label != -100)
    assert all(position >= 3 for position in packed["position_ids"][first_predicting:])
    mask = ancestor_mask(packed["parents"])
    assert mask.sum(dim=1).tolist() == [p + 1 for p in packed["position_ids"]]  # each token sees its own prefix


def _path(packed, index):
    ids = []
    while index >= 0:
        ids.append(packed["input_ids"][index])
        index = packed["parents"][index]
    return ids[::-1]


def test_a_chain_longer_than_max_length_is_split_between_its_steps(tokenizer):
    samples = validate_samples(
        [_sample(s, question=f"Who was born in city {s}?") for s in ("init", "expand", "aggregate")]
    )
    whole = build_training_data(samples, tokenizer, ("init", "expand", "aggregate"), max_length=4096)
    longest = max(len(tokenize_sample(tokenizer, s)["input_ids"]) for s in samples)
    split = build_training_data(samples, tokenizer, ("init", "expand", "aggregate"), max_length=longest + 5)
    assert len(whole.features) == 1 and len(split.features) > 1
    assert all(f["length"] <= longest + 5 for f in split.features)
    assert sum(f["sample_tokens"] for f in split.features) == sum(f["sample_tokens"] for f in whole.features)


def test_config_round_trips_and_rejects_bad_settings():
    config = TrainingConfig(
        weighting="fixed",
        stage_weights={"init": 1, "expand": 1, "aggregate": 2},
        stages=["init", "expand", "aggregate"],
    )
    assert TrainingConfig.from_dict(config.to_dict()) == config
    assert config.stages == ("init", "expand", "aggregate")
    with pytest.raises(SteperError, match="stage_weights"):
        TrainingConfig(weighting="fixed")
    with pytest.raises(SteperError, match="stages"):
        TrainingConfig(stages=("init", "final"))
    with pytest.raises(SteperError, match="learning_rat"):
        TrainingConfig.from_dict({"learning_rat": 1e-4})
    assert "max_steps" not in TrainingConfig().resume_key()


def test_a_tokenizer_without_chat_template_is_refused():
    from types import SimpleNamespace

    with pytest.raises(SteperError, match="chat template"):
        build_training_data(validate_samples([_sample()]), SimpleNamespace(chat_template=None), ("init",), 1024)


def test_the_same_step_of_two_rollouts_is_trained_on_once(tokenizer):
    first = _sample("init")
    again = {**first, "rollout": 1}  # the sampled rollout wrote the very same step
    other = {**_sample("init", question="Who was born in Rome?"), "rollout": 2}
    data = build_training_data(validate_samples([first, again, other]), tokenizer, ("init",), max_length=1024)
    assert data.num_samples == {"init": 2} and data.duplicates == {"init": 1}
