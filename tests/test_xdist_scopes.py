"""`make test` runs pytest-xdist with the scheduler in conftest.py: modules that start a Ray cluster share one worker,
as do modules that start Flower. A new module that starts either must be listed there, or it runs beside another
cluster on the other worker; these tests keep the lists honest."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import FLOWER_MODULES, RAY_MODULES, xdist_scope

TESTS = Path(__file__).parent
#: modules with a single Ray test among many others (a one-off second Ray cluster on the other worker works: the
#: default suite passed with Ray tests spread over both workers); listing them would put their minutes of non-Ray
#: tests on the Ray worker
MIXED = {"test_cli", "test_diffusion_methods"}
STARTS_RAY = re.compile(r"\bray_cluster\b|^\s*import ray\b|\bray\.init\(|\"ray\", \"start\"", re.M)
STARTS_FLOWER = re.compile(r"\bLocalDeployment\b|\brun_simulation\b|flower-superlink")


def _modules(pattern: re.Pattern[str]) -> set[str]:
    return {p.stem for p in TESTS.glob("test_*.py") if p.stem != Path(__file__).stem and pattern.search(p.read_text())}


def test_every_module_that_starts_ray_or_flower_shares_its_worker():
    assert _modules(STARTS_RAY) - RAY_MODULES - MIXED == set()
    assert _modules(STARTS_FLOWER) - FLOWER_MODULES == set()
    assert RAY_MODULES <= {p.stem for p in TESTS.glob("test_*.py")} and FLOWER_MODULES <= {p.stem for p in TESTS.glob("test_*.py")}


def test_scope_is_the_cluster_or_the_module():
    assert xdist_scope("tests/test_ray_train.py::test_one_worker_matches_local[x]") == "ray"
    assert xdist_scope("tests/test_federated.py::test_a") == "flower"
    assert xdist_scope("tests/test_cli.py::test_list") == "tests/test_cli.py"
    assert xdist_scope("tests/test_cli.py::test_list") == xdist_scope("tests/test_cli.py::test_demo_writes_results_and_plot")
