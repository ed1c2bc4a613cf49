"""What the tasks share about their datasets: where built datasets are cached, and the
retrieval tasks' (PIR, CLIP) splits opened from our TFDS builders."""
from __future__ import annotations

import dataclasses
import os

from rsvl_jax.config import ConfigError


def data_dir(config) -> str:
    """`data.data_dir`, or ~/.cache/rsvl_jax/datasets."""
    return config.data.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "rsvl_jax", "datasets")


@dataclasses.dataclass
class RetrievalData:
    tokenizer: object
    splits: dict  # split name -> random-access source
    class_names: list


def open_retrieval(config, layout: str, tokenizer) -> RetrievalData:
    """Builds (once) and opens `data.name` (its `layout` config of annotations) or, for
    "synthetic", the generated scenes; the tokenizer is the task's."""
    from rsvl_jax.data import builders  # TFDS only where data is read (models import without it)

    d = config.data
    if d.name == "synthetic":
        n_eval = d.synthetic_eval_images
        builder = builders.build("synthetic", data_dir(config), config=builders.synthetic_config(
            d.synthetic_train_images, n_eval, n_eval, image_size=d.image_size, seed=config.seed))
    else:
        if not d.manual_dir:
            raise ConfigError(f"set --config.data.manual_dir to your {d.name} folder "
                              "(annotation JSON and images; see rsvl_jax/data/builders)")
        builder = builders.build(d.name, data_dir(config), config=layout, manual_dir=d.manual_dir,
                                 on_error=d.on_error)
    splits = {s: builders.open_split(builder, s) for s in builder.info.splits}
    return RetrievalData(tokenizer, splits, builders.class_names(builder))
