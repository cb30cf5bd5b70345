"""Input data: tfds pipelines, pre-tokenized sets, local dataset builders, image files."""
