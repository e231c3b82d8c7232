"""``POST /generate`` on the causal-LM ``authors`` benchmark (the small ``ci`` GPT-2, cached): a client deletes its
QA pairs, the worker unlearns them, and every completion names the version that wrote it. Slow: transformers import
and the benchmark load."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow


def test_generate_names_the_version_and_a_deletion_changes_it(tmp_path):
    from erasus_ray.benchmarks.authors import qa_text
    from erasus_ray.serve import DeletionService, ServeConfig, UnlearningWorker, create_app

    config = ServeConfig(benchmark="authors", scenario="forget10", benchmark_options={"variant": "ci"},
                         state_dir=str(tmp_path / "state"), max_detectable_auc=None)
    service = DeletionService(config)
    try:
        key = {"Authorization": f"Bearer {service.keys.add('client-0')}"}
        client = TestClient(create_app(service))
        mine = service.ownership.ids_of("client-0")[:10].tolist()
        qa = service.benchmark.info["qa"]
        prompts = [qa_text(*qa[i])[0] for i in mine[:3]]
        before = client.post("/generate", json={"prompts": prompts, "max_new_tokens": 12}, headers=key)
        assert before.status_code == 200 and before.json()["model_version"] == 0
        assert len(before.json()["completions"]) == 3
        memorised = sum(c.strip().startswith(qa[i][1].split()[0]) for c, i in zip(before.json()["completions"], mine))
        assert memorised >= 2  # the original model answers its training questions
        assert client.post("/predict", json={"inputs": [[0.0]]}, headers=key).status_code == 409
        for bad in ({"prompts": []}, {"prompts": ["x"], "max_new_tokens": 10_000}, {"prompts": [1]}, {"prompt": ["x"]}):
            assert client.post("/generate", json=bad, headers=key).status_code == 422, bad
        assert client.post("/generate", json={"prompts": prompts}).status_code == 401

        assert client.post("/v1/deletions", json={"request_id": "qa", "ids": mine}, headers=key).status_code == 202
        done = UnlearningWorker(service).run_once()
        entry = service.ledger.get("qa")
        assert entry.state == "verified" and entry.metrics["verification"]["target"] == "heldout", entry.state_reason
        after = client.post("/generate", json={"prompts": prompts, "max_new_tokens": 12}, headers=key).json()
        assert after["model_version"] == done["published"] == 1
        still = sum(c.strip().startswith(qa[i][1].split()[0]) for c, i in zip(after["completions"], mine))
        assert still < memorised  # measured: 3 of 3 answered before, 0 after (the first words change)
    finally:
        service.close()
