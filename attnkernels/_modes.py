"""The sampling modes and paddings by name, numbered as in torch and csrc/grid_sample_math.h."""

INTERPOLATIONS = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
