"""The set-up contract: dependencies, README commands and CI agree."""
from __future__ import annotations

import re
from importlib.metadata import version

import torch
from packaging.version import Version

from medsec.utils.config import REPO_ROOT


def test_requests_is_current_and_torchattacks_imports() -> None:
    assert Version(version("requests")) >= Version("2.32")
    import torchattacks

    assert hasattr(torchattacks, "PGD")


def test_compressai_runs_beside_numpy_2() -> None:
    """CompressAI (installed --no-deps: it pins numpy<2) imports, and its range coder round-trips."""
    from compressai.entropy_models import EntropyBottleneck

    assert Version(version("numpy")) >= Version("2")
    bottleneck = EntropyBottleneck(4).eval()
    bottleneck.update(force=True)
    y = torch.randn(1, 4, 6, 6) * 3
    strings = bottleneck.compress(y)
    assert torch.equal(bottleneck.decompress(strings, y.shape[-2:]), bottleneck.quantize(y, "dequantize",
                                                                                          bottleneck._get_medians()))


def test_ci_runs_the_readme_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    setup, test = blocks[0].strip(), blocks[2].strip()
    assert setup.startswith("python3 -m venv .venv") and "--no-deps torchattacks" in setup
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index(setup) < ci.index(test)


def test_top_level_layout() -> None:
    for name in ("pyproject.toml", "conf", "medsec", "scripts", "tests", "notebooks", "README.md", ".ci/run"):
        assert (REPO_ROOT / name).exists(), name
