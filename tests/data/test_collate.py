import torch
from hypothesis import given
from hypothesis import strategies as st

from asag.data.collate import collate, pad_images, padded_size
from asag.structures import Batch, ImageTargets
from official import load_inputs


def _sample(h: int, w: int, image_id: int, orig: tuple[int, int]):
    image = torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w) + 1  # no zeros inside
    labels = torch.tensor([0, 1])
    target = ImageTargets(torch.rand(2, 4), labels, image_id=image_id, size=(h, w), orig_size=orig)
    return image, target


def test_collate_pads_to_multiple_of_32_and_records_sizes():
    samples = [_sample(50, 70, 7, (100, 140)), _sample(64, 33, 9, (128, 66))]
    batch = collate(samples)
    assert isinstance(batch, Batch)
    assert batch.images.shape == (2, 3, 64, 96)  # max (64, 70) -> (64, 96)
    assert batch.image_sizes.tolist() == [[50, 70], [64, 33]] and batch.image_sizes.dtype == torch.int64
    assert batch.orig_sizes.tolist() == [[100, 140], [128, 66]] and batch.orig_sizes.dtype == torch.int64
    assert batch.image_ids == [7, 9]
    assert batch.targets[1] is samples[1][1]
    for i, (image, _) in enumerate(samples):
        h, w = image.shape[-2:]
        assert torch.equal(batch.images[i, :, :h, :w], image)
        assert batch.images[i, :, h:, :].abs().sum() == 0 and batch.images[i, :, :, w:].abs().sum() == 0


def test_exact_multiple_is_not_padded():
    batch = collate([_sample(64, 96, 1, (64, 96))])
    assert batch.images.shape == (1, 3, 64, 96)


def test_padded_size_matches_official_fixtures(fixtures_dir):
    """Stage "collate": the official padded batch sizes of fixture cases a and b."""
    for case in ("a", "b"):
        inputs = load_inputs(fixtures_dir, case)
        assert list(padded_size(inputs["image_sizes"])) == list(inputs["padded_hw"])


@given(st.lists(st.tuples(st.integers(1, 130), st.integers(1, 130)), min_size=1, max_size=4))
def test_padding_property(sizes):
    images = [torch.ones(1, h, w) for h, w in sizes]
    padded = pad_images(images)
    hp, wp = padded.shape[-2:]
    max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    assert hp % 32 == 0 and wp % 32 == 0
    assert max_h <= hp < max_h + 32 and max_w <= wp < max_w + 32
    assert padded.sum() == sum(h * w for h, w in sizes)  # zeros everywhere else
