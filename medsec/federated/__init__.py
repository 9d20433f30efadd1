"""Federated training across sites (hospitals) with Flower: `medsec federate`.

``sites`` builds each site's medsec run, ``client`` is the Flower client that trains it locally,
``server`` the strategy wrapper that checks every update, evaluates the global model and writes the
round checkpoints, ``runtime`` runs Flower's simulation, ``federation`` ties them together;
``he_aggregation`` adds the sites' updates as CKKS ciphertexts (``secure_aggregation=ckks``),
``paillier_aggregation`` as Paillier ones (``secure_aggregation=paillier``); both share
``encrypted_sum``.
"""
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when Flower is imported: no usage reports
