"""The adapter API end to end on a tiny random Llama (CPU, seconds, no download).

add LoRA → train a few steps → save in PEFT's format → load into a fresh base → stack a second
adapter → route rows → merge → a plain transformers model.

    python examples/lora_quickstart.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tunesmith


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="where to save the adapters (default: temp)")
    out = parser.parse_args().out or tempfile.mkdtemp(prefix="tunesmith-")

    model = tiny_llama()
    tunesmith.add_lora(model, tunesmith.LoRAConfig(r=8, alpha=16, targets="all-linear"))
    counts = tunesmith.trainable_parameters(model)
    print(f"trainable {counts.trainable:,} of {counts.total:,} parameters ({counts.percent:.2f}%)")

    # Teach it one sequence: only the adapter trains, the base stays bit-identical.
    ids = torch.arange(10, 42).unsqueeze(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    model.eval()

    tunesmith.save_adapter(model, out)  # adapter_config.json + adapter_model.safetensors
    print(f"saved PEFT-format adapter to {out}")

    fresh = tiny_llama()
    tunesmith.load_adapter(fresh, out, name="memorise")
    tunesmith.add_lora(fresh, tunesmith.LoRAConfig(r=4, targets=["q_proj"]), name="other")
    tunesmith.set_active(fresh, "memorise")
    with torch.no_grad():
        tuned = fresh(input_ids=ids).logits
        with tunesmith.disabled(fresh):
            base = fresh(input_ids=ids).logits
        with tunesmith.route(fresh, ["memorise", None]):  # one adapter per row
            routed = fresh(input_ids=ids.repeat(2, 1)).logits
    assert torch.allclose(routed[0], tuned[0], atol=1e-5)
    assert torch.allclose(routed[1], base[0], atol=1e-5)
    print("per-row routing matches separate runs")

    tunesmith.delete_adapter(fresh, "other")
    plain = tunesmith.merge_and_unload(fresh)  # a plain LlamaForCausalLM again
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    print(f"merged vs adapter max |Δlogit| = {(merged - tuned).abs().max().item():.2e}")
    prompt = ids[:, :4]
    generated = plain.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("greedy continuation of 10 11 12 13:", " ".join(map(str, generated[0, 4:].tolist())))


if __name__ == "__main__":
    main()
