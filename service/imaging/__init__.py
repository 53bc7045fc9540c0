"""Image bytes to model input: checked, decoded, oriented, resized, cropped, normalised (preprocess.py).
Pure: it imports nothing of the HTTP face or the engine (bench/ uses it as it is)."""
