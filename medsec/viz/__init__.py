"""PNG plots a person would rather look at than a table."""
from medsec.viz.plots import save_classification_plots, save_sample_grid
from medsec.viz.segmentation import overlay_png

__all__ = ["overlay_png", "save_classification_plots", "save_sample_grid"]
