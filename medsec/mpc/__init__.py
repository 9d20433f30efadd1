"""Secure multi-party computation for inference: two servers that each hold a random share of an
image (:mod:`medsec.mpc.secret_sharing`). Needs numpy only, so a server process starts in a moment."""
