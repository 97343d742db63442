"""The vision track: datasets, models, objectives, engine and class-activation evidence on real images."""
