"""Palettized formats (placeholder until the palette implementation lands)."""
def encode(w, fmt, **_):
    raise NotImplementedError("palettes are being written")
def decode(planes, fmt, rows, cols):
    raise NotImplementedError("palettes are being written")
