"""The sampling modes and paddings by name, numbered as in torch and csrc/grid_sample_math.h, and back."""

INTERPOLATIONS = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}

# The ops take the numbers; the reference (used for double backward) takes the names.
INTERPOLATION_NAMES = {number: name for name, number in INTERPOLATIONS.items()}
PADDING_NAMES = {number: name for name, number in PADDINGS.items()}
