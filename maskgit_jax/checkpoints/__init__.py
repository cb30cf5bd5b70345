"""Checkpoints: the Orbax manager, the pretrained format, the authors' msgpack files."""
