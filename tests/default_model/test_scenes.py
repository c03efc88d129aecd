import numpy as np

from vlmzip.default_model import data


def test_scenes_are_deterministic_and_split_specific():
    a = data.generate_scene(0, "test", 3)
    b = data.generate_scene(0, "test", 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.objects == b.objects
    assert a.image.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert data.MIN_OBJECTS <= len(a.objects) <= data.MAX_OBJECTS
    assert data.scene_objects(0, "train", 3) != a.objects
    assert data.scene_objects(1, "test", 3) != a.objects


def test_questions_answers_are_consistent():
    objects = data.scene_objects(0, "train", 11)
    pool = data.question_pool(objects)
    count_all = next(q for q in pool["count"] if q.question == "how many objects are there?")
    assert count_all.answer == str(len(objects))
    vocab = set(data.answer_vocabulary())
    words = set(data.text_vocabulary())
    for qs in pool.values():
        for q in qs:
            assert q.answer in vocab
            assert set(q.question.replace("?", " ?").split()) <= words


def test_position_questions_name_the_relation_of_two_named_objects():
    objects = (
        data.SceneObject("star", "small", 22.0, 40.0, 300.0, (200, 10, 10), 0.0),
        data.SceneObject("circle", "medium", 40.0, 300.0, 180.0, (10, 200, 10), 0.0),
        data.SceneObject("cross", "small", 22.0, 50.0, 170.0, (10, 10, 200), 0.0),
    )
    asked = {q.question: q.answer for q in data.question_pool(objects)["position"]}
    assert asked["is the star left or right of the circle?"] == "left"
    assert asked["is the circle left or right of the star?"] == "right"
    assert asked["is the star above or below the circle?"] == "below"
    assert asked["is the circle above or below the star?"] == "above"
    # Star and cross differ by only 10 px horizontally (< POSITION_MARGIN): no left/right question about them.
    assert "is the star left or right of the cross?" not in asked
    assert asked["is the cross above or below the star?"] == "above"
    # Both relation words are in every question, so the question never gives its answer away.
    for question, answer in asked.items():
        pair = ("left", "right") if answer in ("left", "right") else ("above", "below")
        assert all(f" {w} " in question for w in pair)
    rng = np.random.default_rng(0)
    answers = [data.sample_questions(objects, rng, per_type=1)[1].answer for _ in range(400)]
    assert {a: answers.count(a) > 60 for a in data.POSITION_ANSWERS} == dict.fromkeys(data.POSITION_ANSWERS, True)


def test_test_split_is_deterministic_and_large_enough():
    records = data.test_split()
    assert len(records) >= 1000
    assert {r.type for r in records} == set(data.QUESTION_TYPES)
    again = list(data.iter_split("test", 5))
    assert [(r.question, r.answers) for r in again] == [(r.question, r.answers) for r in records[: len(again)]]


def test_jsonl_round_trip(tmp_path):
    records = list(data.iter_split("val", 3))
    path = data.export_jsonl(records, tmp_path / "val.jsonl")
    rows = data.load_jsonl(path)
    assert len(rows) == len(records)
    assert rows[0]["question"] == records[0].question
    assert rows[0]["answers"] == records[0].answers
    assert rows[0]["image"].is_file()
    assert len({r["image"] for r in rows}) == 3


def test_group_by_scene_and_accuracy_summary():
    records = data.test_split(num_images=3)
    grouped = data.group_by_scene(list(reversed(records)))
    assert list(grouped) == [0, 1, 2]
    assert sum(len(v) for v in grouped.values()) == len(records)
    assert all(r.scene_index == s for s, recs in grouped.items() for r in recs)
    summary = data.accuracy_summary({"count": [1, 0], "exist": [1, 1, 1, 0]})
    assert summary == {"count": 0.5, "exist": 0.75, "overall": 4 / 6, "questions": 6}


def test_group_by_scene_and_accuracy_summary_reject_empty_or_foreign_input():
    import pytest

    with pytest.raises(ValueError, match="records must not be empty"):
        data.group_by_scene([])
    with pytest.raises(TypeError, match="records must hold Record items, got dict"):
        data.group_by_scene([{"question": "q"}])
    with pytest.raises(ValueError, match="hits must hold at least one question"):
        data.accuracy_summary({"count": []})
