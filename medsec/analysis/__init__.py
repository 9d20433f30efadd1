"""Measuring protections: adversarial attacks and their evaluation, cipher statistics and NIST tests."""
