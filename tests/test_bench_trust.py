"""bench/bench_trust.py's non-lesion set: offline, the same on every run, images the app scores."""

import backbones
import image_input
from bench import bench_trust


def test_non_lesion_set_is_varied_readable_and_the_same_on_every_run(tmp_path):
    no_chromium = tmp_path / "no-chromium"  # the screenshots need a browser; the rest must not
    first = bench_trust.build_non_lesion_set(tmp_path / "first", chromium=no_chromium)
    second = bench_trust.build_non_lesion_set(tmp_path / "second", chromium=no_chromium)

    assert len(first) >= 40
    assert [path.name for path in first] == [path.name for path in second]
    kinds = {bench_trust.kind_of(path) for path in first}
    assert {
        "photo",
        "graphic",
        "medical",
        "map",
        "flat",
        "gradient",
        "noise",
        "text",
        "chart",
        "skin",
    } <= kinds
    for path, again in zip(first, second, strict=True):
        assert path.read_bytes() == again.read_bytes(), path.name
        image = image_input.load_image(path, min_size=backbones.BACKBONES[backbones.DEFAULT_ARCH].image_size)
        assert min(image.size) >= image_input.MIN_IMAGE_SIDE, path.name
