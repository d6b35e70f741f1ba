"""Model labels stay bounded whatever names clients send."""

from __future__ import annotations

from exporter.models import OTHER, ModelLabels


def test_inventory_and_allow_list_get_labels_everything_else_is_other() -> None:
    labels = ModelLabels(allowed=("pinned",))
    labels.set_inventory(["llama3:latest", "qwen3:8b"])
    assert labels.for_request("qwen3:8b") == "qwen3:8b"
    assert labels.for_request("llama3") == "llama3:latest"  # Ollama's implicit tag
    assert labels.for_request("pinned") == "pinned"
    assert {labels.for_request(f"random-{i}") for i in range(1000)} == {OTHER}
    # A served name outside the inventory is not learned while the inventory is known.
    assert labels.for_answer("random-1", "random-1", success=True) == OTHER


def test_single_model_server_maps_any_name_to_its_model() -> None:
    labels = ModelLabels()
    labels.set_inventory(["/models/smol.gguf"], single_model_server=True)
    assert labels.for_request("gpt-4o") == "/models/smol.gguf"
    assert labels.for_answer("gpt-4o", "/models/smol.gguf", success=True) == "/models/smol.gguf"


def test_without_inventory_learning_is_capped_and_needs_success() -> None:
    labels = ModelLabels(max_learned=3)
    assert labels.for_answer("m0", "m0", success=False) == OTHER
    for i in range(10):
        labels.for_answer(f"m{i}", f"m{i}", success=True)
    assert labels.known == {"m0", "m1", "m2"}
    assert labels.for_request("m9") == OTHER
