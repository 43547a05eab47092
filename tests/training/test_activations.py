"""Input covariances on the tiny model: shared inputs share one matrix, and each equals E[x x^T] over the
real tokens computed directly from the model's own layers."""

import torch

from matryoshka_lora.adapters import store
from matryoshka_lora.models import load_base_model
from matryoshka_lora.training import data, tasks
from matryoshka_lora.training.activations import input_covariances

TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "down_proj")


def test_covariances_are_the_inputs_second_moment(tiny_model_dir, tmp_path):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter

    model, tokenizer = load_base_model(tiny_model_dir)
    path = save_random_adapter(model, tmp_path / "a", "a", 4, seed=5, std=0.3, target_modules=TARGETS)
    adapter = store.load_adapter(path)
    covs = input_covariances(model, tokenizer, adapter, "reverse", num_examples=5, batch_size=2)
    assert set(covs) == set(adapter.weights)
    attn = "model.layers.0.self_attn"
    assert covs[f"{attn}.q_proj"] is covs[f"{attn}.k_proj"] is covs[f"{attn}.v_proj"]
    down = covs["model.layers.0.mlp.down_proj"]
    assert down.shape == (model.config.intermediate_size,) * 2
    torch.testing.assert_close(down, down.T)
    assert float(torch.linalg.eigvalsh(down).min()) > -1e-9

    # layer 0's attention input is input_layernorm(embeddings): no adapter upstream of it
    records = data.records_from_examples(tasks.task_examples("reverse", "train", 5))
    batch = data.collate_records(tokenizer, records, 1024)
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(batch["input_ids"]))
    rows = hidden[batch["attention_mask"].bool()].double()
    torch.testing.assert_close(covs[f"{attn}.q_proj"], rows.T @ rows / rows.shape[0], atol=1e-6, rtol=1e-5)
