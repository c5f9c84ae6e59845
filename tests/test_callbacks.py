"""Validation overlays reach TensorBoard and GIFs during a (tiny) training run."""

from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medseg import pipeline
from medseg.callbacks import ValidationOverlays
from medseg.errors import ConfigError

from .conftest import compose_config, tiny_overrides


def test_overlays_are_logged_to_tensorboard_and_written_as_gifs(tmp_path, phantom_root):
    overrides = [
        *tiny_overrides(tmp_path, phantom_root),
        "trainer.max_epochs=2",
        "callbacks.validation_overlays.num_cases=2",
        "callbacks.validation_overlays.gif_every_n_epochs=2",
        "test=false",
    ]
    cfg = compose_config("train", overrides)
    pipeline.train(cfg)
    run = Path(cfg.paths.output_dir)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert len(tags) == 2 and all(t.startswith("val/overlay_phantom_") for t in tags)
    assert len(events.Images(tags[0])) == 2  # one per validation (every epoch here)
    gifs = sorted((run / "overlays").iterdir())
    assert [g.name.split("_phantom")[0] for g in gifs] == ["epoch_001", "epoch_001"]
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 16  # one frame per axial slice of the 48x48x16 phantom


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_cases": 0}, "num_cases must be an integer >= 1"),
        ({"gif_every_n_epochs": 2}, "dirpath is needed"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ValidationOverlays(**kwargs)
