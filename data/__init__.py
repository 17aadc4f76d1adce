"""The embedded data of the project: the tiny world (data/tinyworld.py). Nothing is loaded at import."""
