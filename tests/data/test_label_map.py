import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asag.data.labels import LabelMap
from asag.errors import DataError

# The 80 COCO 2017 category ids (1..90 with gaps).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_non_contiguous_ids_sorted_and_round_trip():
    lm = LabelMap.from_categories([{"id": 90, "name": "c"}, {"id": 1, "name": "a"}, {"id": 5, "name": "b"}])
    assert lm.category_ids == (1, 5, 90)
    assert lm.names == ("a", "b", "c")
    assert lm.num_classes == 3
    assert lm.to_category_ids(torch.tensor([0, 1, 2, 2, 0])).tolist() == [1, 5, 90, 90, 1]
    assert lm.to_labels(torch.tensor([90, 1, 5])).tolist() == [2, 0, 1]
    assert lm.index_of(5) == 1 and lm.name_of(2) == "c"


def test_to_dict_is_plain_data_and_round_trips():
    lm = LabelMap.from_categories([{"id": 90, "name": "c"}, {"id": 1, "name": "a"}, {"id": 5, "name": "b"}])
    data = json.loads(json.dumps(lm.to_dict()))
    assert data == {"category_ids": [1, 5, 90], "names": ["a", "b", "c"]}
    assert LabelMap.from_dict(data) == lm


def test_coco_table_matches_official_postprocess_mapping():
    # Official fixtures README: contiguous index 11 -> id 13, index 79 -> id 90.
    lm = LabelMap.from_categories([{"id": i, "name": str(i)} for i in reversed(COCO_IDS)])
    assert lm.num_classes == 80
    assert lm.to_category_ids(torch.tensor([0, 11, 79])).tolist() == [1, 13, 90]


def test_unknown_values_raise():
    lm = LabelMap((1, 5, 90), ("a", "b", "c"))
    with pytest.raises(ValueError, match="unknown category ids \\[2\\]"):
        lm.to_labels(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0..2"):
        lm.to_category_ids(torch.tensor([3]))


def test_bad_categories_raise():
    with pytest.raises(DataError, match="x.json: duplicate category ids \\[3\\]"):
        LabelMap.from_categories([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}], "x.json")
    with pytest.raises(DataError, match="x.json: the 'categories' list is empty"):
        LabelMap.from_categories([], "x.json")
    with pytest.raises(DataError, match="category #0 has no integer 'id'"):
        LabelMap.from_categories([{"name": "a"}], "x.json")


@given(st.sets(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=50), st.data())
def test_round_trip_property(ids, data):
    cats = [{"id": i, "name": f"n{i}"} for i in ids]
    lm = LabelMap.from_categories(cats)
    assert list(lm.category_ids) == sorted(ids)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, len(ids) - 1), max_size=20)), dtype=torch.int64)
    assert torch.equal(lm.to_labels(lm.to_category_ids(labels)), labels)
    assert LabelMap.from_dict(lm.to_dict()) == lm
