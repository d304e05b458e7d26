"""The --image rules of the command-line programs: how many input images each kind of model takes, and how they
reach the pipeline."""

from __future__ import annotations

import pytest

from teacache_models.cli import CliError, check_image_count, image_inputs, load_images
from teacache_models.zoo import TASK_IMAGES, TASKS


@pytest.mark.parametrize(
    "count, takes, max_images, message",
    [
        (0, "required", 1, "m needs an input image: --image FILE is required$"),
        (0, "required", 3, r"m needs an input image: --image FILE is required \(up to 3 times\)"),
        (1, "no", 0, "--image has no effect on m: it takes no input image"),
        (2, "required", 1, "--image given 2 times, but m takes at most 1 input image$"),
        (4, "required", 3, "--image given 4 times, but m takes at most 3 input images$"),
        (2, "optional", 1, "--image given 2 times, but m takes at most 1 input image$"),
    ],
)
def test_refused_image_counts(count, takes, max_images, message):
    with pytest.raises(CliError, match=message):
        check_image_count(count, takes, max_images, "m")


@pytest.mark.parametrize(
    "count, takes, max_images",
    [
        (0, "no", 0),
        (0, "optional", 1),
        (1, "optional", 1),
        (1, "required", 1),
        (3, "required", 3),
        (5, "required", None),
    ],
)
def test_accepted_image_counts(count, takes, max_images):
    check_image_count(count, takes, max_images, "m")


def test_every_task_says_what_it_takes():
    assert set(TASK_IMAGES) == set(TASKS)
    assert TASK_IMAGES["t2i"] == ("no", 0) and TASK_IMAGES["i2v"] == ("required", 1)
    assert TASK_IMAGES["edit"][0] == "required"


def test_images_reach_the_pipeline_in_order(tmp_path):
    from PIL import Image

    paths = []
    for i, mode in enumerate(("RGBA", "L", "RGB")):
        paths.append(tmp_path / f"{i}.png")
        Image.new(mode, (3 + i, 2), "red" if mode != "L" else 128).save(paths[-1])
    images = load_images(paths)
    assert [image.mode for image in images] == ["RGBA", "RGB", "RGB"]  # transparency kept for layered models
    assert [image.size for image in images] == [(3, 2), (4, 2), (5, 2)]
    assert image_inputs([]) == {}
    assert image_inputs(images[:1]) == {"image": images[0]}
    assert image_inputs(images) == {"image": images}
    with pytest.raises(CliError, match=r"missing\.png' does not exist"):
        load_images([paths[0], tmp_path / "missing.png"])
