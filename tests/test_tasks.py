"""Task sources: sinusoid (Finn et al. ranges), a local Omniglot-layout folder, sklearn digits."""

from __future__ import annotations

import math

import pytest
import torch

from fastmeta.tasks import (
    Episode,
    FewShotTasks,
    ImageReadError,
    OmniglotFolder,
    SinusoidTasks,
    TensorClass,
    digits_tasks,
    omniglot_tasks,
    sinusoid,
)

PIL = pytest.importorskip("PIL.Image", reason="Omniglot reader tests need Pillow")

# ---------------------------------------------------------------------------------------------
# Episode


def test_episode_checks_shapes():
    x, y = torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)
    Episode(x, y, torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="disagree on \\[T, n\\]"):
        Episode(x, torch.zeros(2, 4, 1), x, y)
    with pytest.raises(ValueError, match="disagree on T"):
        Episode(x, y, torch.zeros(3, 5, 1), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="different example shapes"):
        Episode(x, y, torch.zeros(2, 5, 2), y)
    with pytest.raises(ValueError, match="leading task"):
        Episode(torch.zeros(5), torch.zeros(5), x, y)


def test_episode_to_casts_floats_only():
    ep = Episode(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long),
                 torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
    moved = ep.to(torch.float64)
    assert moved.support_x.dtype == torch.float64
    assert moved.support_y.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# Sinusoid


def test_sinusoid_shapes_and_finn_ranges():
    ep = SinusoidTasks(seed=0).sample(4000, shots=10, queries=7)
    assert ep.support_x.shape == ep.support_y.shape == (4000, 10, 1)
    assert ep.query_x.shape == ep.query_y.shape == (4000, 7, 1)
    assert ep.amplitude.shape == ep.phase.shape == (4000,)
    assert 0.1 <= ep.amplitude.min() and ep.amplitude.max() <= 5.0
    assert 0.0 <= ep.phase.min() and ep.phase.max() <= math.pi
    assert -5.0 <= ep.support_x.min() and ep.support_x.max() <= 5.0
    # the draws cover their ranges (uniform, 4000 samples)
    assert ep.amplitude.min() < 0.2 and ep.amplitude.max() > 4.9
    assert ep.phase.max() > 3.0 and ep.support_x.min() < -4.9
    expected = ep.amplitude.view(-1, 1, 1) * torch.sin(ep.support_x - ep.phase.view(-1, 1, 1))
    torch.testing.assert_close(ep.support_y, expected)
    torch.testing.assert_close(ep.query_y, sinusoid(ep.query_x, ep.amplitude, ep.phase))


def test_sinusoid_default_query_is_k_points():
    ep = SinusoidTasks(seed=0).sample(3, shots=5)
    assert ep.query_x.shape == (3, 5, 1)


def test_sinusoid_grid_query():
    tasks = SinusoidTasks(seed=0)
    grid = tasks.grid()
    assert grid.shape == (100, 1)
    torch.testing.assert_close(grid[:, 0], torch.linspace(-5, 5, 100))
    ep = tasks.sample(3, shots=5, grid_query=True)
    assert ep.query_x.shape == (3, 100, 1)
    torch.testing.assert_close(ep.query_x[2], grid)


def test_sinusoid_is_deterministic_per_seed():
    a = SinusoidTasks(seed=3).sample(5, shots=10)
    b = SinusoidTasks(seed=3).sample(5, shots=10)
    c = SinusoidTasks(seed=4).sample(5, shots=10)
    torch.testing.assert_close(a.support_x, b.support_x)
    torch.testing.assert_close(a.amplitude, b.amplitude)
    assert not torch.equal(a.support_x, c.support_x)


def test_sinusoid_generator_override_and_state():
    tasks = SinusoidTasks(seed=0)
    fixed = tasks.sample(2, 5, generator=torch.Generator().manual_seed(9))
    again = SinusoidTasks(seed=1).sample(2, 5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(fixed.support_x, again.support_x)
    state = tasks.state_dict()
    first = tasks.sample(2, 5)
    tasks.load_state_dict(state)
    torch.testing.assert_close(tasks.sample(2, 5).support_y, first.support_y)


def test_sinusoid_global_rng_without_seed():
    torch.manual_seed(5)
    a = SinusoidTasks().sample(2, 5)
    torch.manual_seed(5)
    b = SinusoidTasks().sample(2, 5)
    torch.testing.assert_close(a.support_x, b.support_x)
    with pytest.raises(ValueError, match="disagree"):
        SinusoidTasks().load_state_dict(SinusoidTasks(seed=0).state_dict())


@pytest.mark.parametrize("kwargs", [{"num_tasks": 0, "shots": 5}, {"num_tasks": 2, "shots": 0},
                                    {"num_tasks": 2, "shots": 5, "queries": 0}])
def test_sinusoid_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError):
        SinusoidTasks(seed=0).sample(**kwargs)


def test_sinusoid_dtype():
    assert SinusoidTasks(seed=0, dtype=torch.float64).sample(2, 3).support_x.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Omniglot layout

ALPHABETS = {"Alpha": ["char01", "char02", "char03"], "Beta": ["char01", "char02"],
             "Gamma": ["char01"]}
IMAGES_PER_CHARACTER = 4
RAW_SIZE = 14  # small stand-ins for Omniglot's 105x105 PNGs


def _gray_level(character: int, image: int) -> int:
    """A distinct, constant gray level per image, so a test can tell which image it got."""
    return 20 + 8 * (character * IMAGES_PER_CHARACTER + image)


@pytest.fixture
def omniglot_root(tmp_path):
    root = tmp_path / "omniglot"
    index = 0
    for alphabet, characters in ALPHABETS.items():
        for character in characters:
            folder = root / alphabet / character
            folder.mkdir(parents=True)
            for j in range(IMAGES_PER_CHARACTER):
                PIL.new("L", (RAW_SIZE, RAW_SIZE), color=_gray_level(index, j)).save(
                    folder / f"{index:04d}_{j:02d}.png")
            index += 1
    return root


def test_omniglot_scan(omniglot_root):
    folder = OmniglotFolder(omniglot_root)
    assert folder.characters == ["Alpha/char01", "Alpha/char02", "Alpha/char03",
                                 "Beta/char01", "Beta/char02", "Gamma/char01"]
    assert folder.alphabets == ["Alpha", "Beta", "Gamma"]
    assert all(len(v) == IMAGES_PER_CHARACTER for v in folder.files.values())


def test_omniglot_rotations_are_classes(omniglot_root):
    folder = OmniglotFolder(omniglot_root)
    tasks = folder.tasks()
    assert tasks.num_classes == 6 * 4
    names = [c.name for c in tasks.classes]
    assert names[:4] == ["Alpha/char01", "Alpha/char01@rot90", "Alpha/char01@rot180",
                         "Alpha/char01@rot270"]
    # a rotated class holds the rotated images of its character
    pattern = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28) / (28 * 28)
    for cls in tasks.classes[:4]:
        cls.images = pattern.expand(IMAGES_PER_CHARACTER, -1, -1, -1)
    idx = torch.tensor([0, 2])
    upright = tasks.classes[0].load(idx)
    for k, cls in enumerate(tasks.classes[:4]):
        torch.testing.assert_close(cls.load(idx), torch.rot90(upright, k, dims=(-2, -1)))
    only_upright = OmniglotFolder(omniglot_root, rotations=(0,)).tasks()
    assert only_upright.num_classes == 6


def test_omniglot_images_are_28x28_gray_in_unit_range(omniglot_root):
    tasks = OmniglotFolder(omniglot_root).tasks(["Alpha/char02"])
    images = tasks.classes[0].load(torch.arange(IMAGES_PER_CHARACTER))
    assert images.shape == (IMAGES_PER_CHARACTER, 1, 28, 28)
    assert images.dtype == torch.float32
    expected = torch.tensor([_gray_level(1, j) for j in range(IMAGES_PER_CHARACTER)]) / 255.0
    torch.testing.assert_close(images.mean(dim=(1, 2, 3)), expected, atol=2 / 255, rtol=0)


def test_omniglot_episode_shapes_and_labels(omniglot_root):
    tasks = OmniglotFolder(omniglot_root).tasks(seed=0)
    ep = tasks.sample(6, ways=5, shots=1, queries=3)
    assert ep.support_x.shape == (6, 5, 1, 28, 28)
    assert ep.query_x.shape == (6, 15, 1, 28, 28)
    assert torch.equal(ep.support_y, torch.arange(5).expand(6, 5))
    assert torch.equal(ep.query_y, torch.arange(5).repeat_interleave(3).expand(6, 15))
    # each label is one character; within it, the 1 + 3 images are distinct
    levels = torch.cat([ep.support_x, ep.query_x], dim=1).mean(dim=(2, 3, 4)) * 255
    labels = torch.cat([ep.support_y, ep.query_y], dim=1)
    image_ids = ((levels - 20) / 8).round().long()
    for t in range(6):
        for label in range(5):
            ids = image_ids[t][labels[t] == label]
            assert len(set(ids.tolist())) == 4
            assert len(set((ids // IMAGES_PER_CHARACTER).tolist())) == 1


def test_omniglot_labels_are_shuffled_per_episode(omniglot_root):
    tasks = OmniglotFolder(omniglot_root, rotations=(0,)).tasks(seed=0)
    ep = tasks.sample(20, ways=3, shots=1, queries=0)
    character_of_label0 = (ep.support_x[:, 0].mean(dim=(1, 2, 3)) * 255 - 20) // 32
    assert len(set(character_of_label0.tolist())) > 1


def test_omniglot_sampling_is_deterministic(omniglot_root):
    folder = OmniglotFolder(omniglot_root)
    a = folder.tasks(seed=1).sample(3, ways=5, shots=2, queries=2)
    b = folder.tasks(seed=1).sample(3, ways=5, shots=2, queries=2)
    torch.testing.assert_close(a.query_x, b.query_x)


@pytest.mark.parametrize("by", ["character", "alphabet"])
def test_omniglot_split(omniglot_root, by):
    folder = OmniglotFolder(omniglot_root)
    parts = folder.split(by=by, fractions=(0.5, 0.2, 0.3), seed=0)
    assert set(parts) == {"train", "val", "test"}
    every = [c for part in parts.values() for c in part]
    assert sorted(every) == folder.characters  # disjoint and complete
    assert all(parts.values())
    assert parts == folder.split(by=by, fractions=(0.5, 0.2, 0.3), seed=0)
    if by == "alphabet":
        alphabets = [{c.split("/")[0] for c in part} for part in parts.values()]
        assert not (alphabets[0] & alphabets[1] or alphabets[0] & alphabets[2]
                    or alphabets[1] & alphabets[2])
    train = omniglot_tasks(omniglot_root, "train", by=by, fractions=(0.5, 0.2, 0.3), seed=0)
    assert {c.name.split("@")[0] for c in train.classes} == set(parts["train"])


def test_omniglot_split_gives_every_part_a_unit(omniglot_root):
    folder = OmniglotFolder(omniglot_root)
    parts = folder.split(by="alphabet", fractions=(0.9, 0.05, 0.05))
    assert [len({c.split("/")[0] for c in p}) for p in parts.values()] == [1, 1, 1]
    assert folder.split(fractions=(1, 0, 0))["test"] == []
    two_alphabets = folder.alphabets[:2]
    for alphabet in folder.alphabets[2:]:
        for png in (omniglot_root / alphabet).glob("*/*.png"):
            png.unlink()
        for character in (omniglot_root / alphabet).iterdir():
            character.rmdir()
        (omniglot_root / alphabet).rmdir()
    assert OmniglotFolder(omniglot_root).alphabets == two_alphabets
    with pytest.raises(ValueError, match="leaving one empty"):
        OmniglotFolder(omniglot_root).split(by="alphabet")


def test_omniglot_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniglotFolder(tmp_path / "nowhere")


def test_omniglot_no_classes(tmp_path):
    (tmp_path / "alphabet_without_characters").mkdir()
    with pytest.raises(ValueError, match="no classes"):
        OmniglotFolder(tmp_path)


def test_omniglot_too_few_examples(omniglot_root):
    tasks = OmniglotFolder(omniglot_root).tasks(seed=0)
    with pytest.raises(ValueError, match="has 4 examples, fewer than shots \\+ queries"):
        tasks.sample(2, ways=5, shots=1, queries=4)
    with pytest.raises(ValueError, match="only 24 are available"):
        tasks.sample(2, ways=25, shots=1, queries=1)


def test_omniglot_character_without_images(omniglot_root):
    (omniglot_root / "Gamma" / "char_empty").mkdir()
    tasks = OmniglotFolder(omniglot_root).tasks(seed=0)
    with pytest.raises(ValueError, match="'Gamma/char_empty' has 0 examples"):
        tasks.sample(1, ways=2, shots=1, queries=1)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_omniglot_unreadable_image_is_named(omniglot_root, damage):
    bad = omniglot_root / "Beta" / "char02" / "0004_01.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a png file")
    else:
        bad.write_bytes(bad.read_bytes()[:40])
    folder = OmniglotFolder(omniglot_root)  # scanning does not read images
    with pytest.raises(ImageReadError, match="0004_01.png"):
        folder.tasks()
    folder.tasks(["Alpha/char01"])  # other characters still load


def test_omniglot_unknown_character(omniglot_root):
    with pytest.raises(KeyError, match="Zeta/char09"):
        OmniglotFolder(omniglot_root).tasks(["Zeta/char09"])


def test_fewshot_rejects_bad_counts():
    tasks = FewShotTasks([TensorClass(str(c), torch.rand(3, 1, 4, 4)) for c in range(3)], seed=0)
    for kwargs in ({"ways": 0, "shots": 1, "queries": 1}, {"ways": 2, "shots": 0, "queries": 1},
                   {"ways": 2, "shots": 1, "queries": -1}):
        with pytest.raises(ValueError):
            tasks.sample(1, **kwargs)
    with pytest.raises(ValueError, match="at least one class"):
        FewShotTasks([])


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits tasks need scikit-learn")
    return {split: digits_tasks(split, seed=0) for split in ("train", "val", "test")}


def test_digits_held_out_classes(digits):
    names = {split: {c.name for c in t.classes} for split, t in digits.items()}
    assert {n.split("@")[0] for n in names["train"]} == {"0", "1", "2", "3", "4"}
    assert len(names["train"]) == 20  # 5 digits x 4 rotations
    assert names["val"] == names["test"] == {"5", "6", "7", "8", "9"}


def test_digits_val_and_test_share_no_image(digits):
    for val_cls, test_cls in zip(digits["val"].classes, digits["test"].classes):
        val = {tuple(x.flatten().tolist()) for x in val_cls.images}
        test = {tuple(x.flatten().tolist()) for x in test_cls.images}
        assert len(val_cls) + len(test_cls) > 170 and len(val_cls) > 50
        assert len(val & test) <= 2  # a few digits are pixel-identical duplicates in the data


def test_digits_episodes(digits):
    ep = digits["test"].sample(8, ways=5, shots=1, queries=15)
    assert ep.support_x.shape == (8, 5, 1, 8, 8)
    assert ep.query_x.shape == (8, 75, 1, 8, 8)
    assert ep.support_x.dtype == torch.float32
    assert 0 <= ep.query_x.min() and ep.query_x.max() <= 1 and ep.query_x.max() > 0.9
    assert torch.equal(ep.query_y[0], torch.arange(5).repeat_interleave(15))
    train = digits["train"].sample(4, ways=5, shots=5, queries=5)
    assert train.support_x.shape == (4, 25, 1, 8, 8)


def test_digits_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        digits_tasks("everything")
