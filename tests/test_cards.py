"""Model cards: every folder train, merge and quantize write has a README.md whose Hugging
Face metadata `huggingface_hub.ModelCard` parses; GGUF files carry the same facts; the
Ollama Modelfile's template renders chats as the model's chat template does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.runs import ROOT, make_config, preference_config, quiet
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

import tunesmith
from tunesmith.cards import Card, base_license
from tunesmith.export.ollama import TEMPLATES, modelfile_text, template_family
from tunesmith.train.loop import train

BUNDLED = ROOT / "examples" / "tiny-llama"


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_a_trained_adapter_and_model_get_cards(tmp_path, tiny_dir):
    (tiny_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    try:
        train(make_config(tmp_path / "a", tiny_dir, train={"max_steps": 2}), progress=quiet())
        reward = preference_config(
            tmp_path / "r", tiny_dir, "reward", method={"name": "full"}, train={"max_steps": 2}
        )
        train(reward, progress=quiet())
    finally:
        (tiny_dir / "README.md").unlink()
    card = card_of(tmp_path / "a" / "out" / "adapter")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"  # the base's own
    assert data["tags"] == ["tunesmith", "lora", "sft", "peft"]
    assert "base_model" not in data  # a local path is named in the text, not as a hub id
    assert f"a lora adapter on `{tiny_dir}`" in card.text
    assert "| validation loss |" in card.text and "PeftModel.from_pretrained" in card.text
    reward_card = card_of(tmp_path / "r" / "out" / "model").data.to_dict()
    assert reward_card["pipeline_tag"] == "text-classification"
    assert reward_card["library_name"] == "transformers"


def test_hub_bases_and_datasets_go_in_the_metadata():
    card = Card(
        "x",
        base_model="meta-llama/Llama-3.2-1B",
        datasets=["HuggingFaceH4/ultrafeedback_binarized", "data/local.jsonl"],
        tags=["lora"],
    )
    data = ModelCard(card.text()).data.to_dict()
    assert data["base_model"] == "meta-llama/Llama-3.2-1B"
    assert data["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert base_license("meta-llama/Llama-3.2-1B") is None  # nothing is fetched


def test_merge_and_quantize_write_cards(tmp_path, tiny_dir):
    train(make_config(tmp_path / "a", tiny_dir, train={"max_steps": 1}), progress=quiet())
    adapter = tmp_path / "a" / "out" / "adapter"
    tunesmith.merge_checkpoint(str(tiny_dir), [str(adapter)], tmp_path / "merged", verify=True)
    merged = card_of(tmp_path / "merged")
    assert merged.data.to_dict()["tags"] == ["tunesmith", "merge", "lora"]
    assert "largest logit difference" in merged.text
    from tunesmith.quantize.pipeline import QuantizeSettings

    held_out = str(ROOT / "examples" / "data" / "pydoc_heldout.jsonl")
    settings = QuantizeSettings("rtn", eval_data=held_out, eval_samples=2, seq_len=64)
    tunesmith.quantize_checkpoint(str(tmp_path / "merged"), tmp_path / "q", settings)
    quantized = card_of(tmp_path / "q")
    assert {"quantized", "rtn", "4-bit"} <= set(quantized.data.to_dict()["tags"])
    assert "perplexity (held-out)" in quantized.text


def test_gguf_files_carry_the_cards_facts(tmp_path, tiny_dir):
    import gguf

    from tunesmith.export.gguf import export_gguf

    train(make_config(tmp_path / "a", tiny_dir, train={"max_steps": 1}), progress=quiet())
    out = tmp_path / "m" / "model.gguf"
    export_gguf(str(tiny_dir), out, [str(tmp_path / "a" / "out" / "adapter")], ollama=True)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["general.base_model.count"] == 1
    assert fields["general.base_model.0.name"] == tiny_dir.name
    assert fields["general.tags"] == ["tunesmith", "merge"]
    assert (
        fields["general.description"] == f"{tiny_dir.name} with adapters merged by tunesmith: out"
    )
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./model.gguf\nTEMPLATE """{{- range .Messages }}')
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def render_go(template: str, messages: list[dict]) -> str:
    """Ollama's template language, as much of it as the ChatML and Llama 3 templates use:
    one `range .Messages` loop over `.Role` and `.Content`, then the generation prompt."""
    head, rest = template.split("{{- range .Messages }}", 1)
    body, tail = rest.split("{{ end }}", 1)
    out = head
    for m in messages:
        out += body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
    return out + tail


@pytest.mark.parametrize("family", ["chatml", "llama-3"])
def test_the_ollama_template_renders_chats_as_the_chat_template_does(family):
    from tunesmith.data.templates import BUILTIN_TEMPLATES

    jinja = BUILTIN_TEMPLATES[family]
    assert template_family(jinja) == family
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    expected = tokenizer.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
    )
    expected = re.sub(r"^<\|begin_of_text\|>", "", expected)  # llama.cpp adds the BOS token
    assert render_go(TEMPLATES[family][1], messages) == expected


def test_an_unknown_template_is_left_to_ollama_with_a_note(tmp_path):
    text, notes = modelfile_text("m.gguf", "{{ messages }}", ["</s>"], tmp_path)
    assert text == 'FROM ./m.gguf\nPARAMETER stop "</s>"\n'
    assert notes[0].startswith("Modelfile: the chat template is not one Ollama's TEMPLATE")
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    text, _ = modelfile_text("m.gguf", None, [], tmp_path)
    assert text.endswith("PARAMETER temperature 0.6\nPARAMETER top_p 0.9\n")
