"""mrplab: why mask-reconstruction pretraining helps, made runnable and measurable."""

__version__ = "0.1.0"
