"""The tiny he_cnn the HE tests share (8x8 images, 2 channels, hidden 4), compiled once per session:
:func:`medsec.he.testing.tiny_program`, which ``scripts/loadtest_serve.py`` serves too."""
from __future__ import annotations

from medsec.he.testing import tiny_program as tiny

__all__ = ["tiny"]
