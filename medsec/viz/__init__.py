"""PNG plots a person would rather look at than a table."""
from medsec.viz.plots import save_classification_plots, save_sample_grid

__all__ = ["save_classification_plots", "save_sample_grid"]
