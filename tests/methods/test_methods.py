"""IA3, prompt tuning, prefix tuning and bottleneck adapters: invariants, PEFT parity both ways,
generation with the KV cache, merging, training and exact resume, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.models import ARCHS, VOCAB, input_ids, logits, make_model
from helpers.runs import make_config, quiet
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixConfig
from peft import PromptTuningConfig as PeftPromptConfig
from safetensors.torch import load_file
from torch import nn

import tunesmith
from tunesmith.config import config_from_dict
from tunesmith.errors import AdapterError, TunesmithError
from tunesmith.methods.ia3.impl import ia3_layers
from tunesmith.methods.prompt.layer import virtual_tokens
from tunesmith.train import checkpoint as checkpoint_module
from tunesmith.train.loop import train
from tunesmith.train.loss import causal_lm_loss_sum, model_loss_sum

ATOL = 1e-5
N = 3  # virtual tokens


class WordTokenizer:
    """Just enough tokenizer for init "text": the text is space-separated token ids."""

    all_special_ids = [0, 1, 2]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}


def peft_config(kind: str):
    return {
        "ia3": PeftIA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
        "prompt": PeftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "prefix": PeftPrefixConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    }[kind]


def ours(kind: str, **overrides):
    return {
        "ia3": tunesmith.IA3Config,
        "prompt": lambda **k: tunesmith.PromptTuningConfig(num_virtual_tokens=N, **k),
        "prefix": lambda **k: tunesmith.PrefixTuningConfig(num_virtual_tokens=N, **k),
        "bottleneck": tunesmith.BottleneckConfig,
    }[kind](**overrides)


@torch.no_grad()
def peft_logits(model, ids, kind: str) -> torch.Tensor:
    out = model(input_ids=ids).logits
    return out[:, N:] if kind == "prompt" else out  # PEFT keeps the prompt positions


@torch.no_grad()
def perturb(model: nn.Module, name: str = "default", seed: int = 3) -> None:
    """Give a fresh adapter non-trivial weights."""
    gen = torch.Generator().manual_seed(seed)
    for param_name, p in model.named_parameters():
        if f".{name}." in f".{param_name}." and p.requires_grad:
            if "ia3" in param_name or ".adapters." in param_name and p.dim() == 2 and 1 in p.shape:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


PEFT_ARCHS = ["llama", "gpt2", "qwen2", "gemma", "mistral"]


@pytest.mark.parametrize("kind", ["ia3", "prompt", "prefix"])
@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_we_load_what_peft_saves_and_peft_loads_what_we_save(arch, kind, tmp_path):
    torch.manual_seed(5)
    theirs = get_peft_model(make_model(arch), peft_config(kind)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ids = input_ids()
    expected = peft_logits(theirs, ids, kind)
    assert (expected - logits(make_model(arch), ids)).abs().max() > 1e-3  # not the base model

    model = make_model(arch)
    tunesmith.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)

    # ours, made fresh by tunesmith and trained (perturbed), loads in PEFT
    model = make_model(arch)
    tunesmith.add_adapter(model, ours(kind))
    perturb(model)
    mine = logits(model, ids)
    tunesmith.save_adapter(model, tmp_path / "ours")
    back = PeftModel.from_pretrained(make_model(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_logits(back, ids, kind), mine, atol=ATOL, rtol=0)


def test_saved_configs_have_peft_keys(tmp_path):
    for kind in ("ia3", "prompt", "prefix"):
        torch.manual_seed(5)
        get_peft_model(make_model("llama"), peft_config(kind)).save_pretrained(tmp_path / kind)
        model = make_model("llama")
        tunesmith.add_adapter(model, ours(kind))
        tunesmith.save_adapter(model, tmp_path / f"ours_{kind}")
        theirs = json.loads((tmp_path / kind / "adapter_config.json").read_text())
        mine = json.loads((tmp_path / f"ours_{kind}" / "adapter_config.json").read_text())
        assert set(mine) == set(theirs) - {"peft_version"}, kind
        for key in ("peft_type", "num_virtual_tokens", "token_dim", "num_layers",
                    "num_attention_heads", "target_modules", "feedforward_modules"):  # fmt: skip
            a, b = mine.get(key), theirs.get(key)
            if isinstance(a, list):
                a, b = sorted(a), sorted(b)
            assert a == b, (kind, key)
        their_shapes = {
            k: v.shape for k, v in load_file(tmp_path / kind / "adapter_model.safetensors").items()
        }  # noqa: E501
        my_file = tmp_path / f"ours_{kind}" / "adapter_model.safetensors"
        assert {k: v.shape for k, v in load_file(my_file).items()} == their_shapes


def test_prefix_trained_through_an_mlp_saves_flat_and_resumes_exactly(tmp_path):
    model = make_model("llama")
    tunesmith.add_prefix_tuning(model, ours("prefix", projection=True, init="random"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("transform" in n for n in trainable)
    ids = input_ids()
    expected = logits(model, ids)
    tunesmith.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (N, 2 * 2 * 2 * 8)  # layers·2·kv_heads·head_dim
    theirs = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    torch.testing.assert_close(peft_logits(theirs, ids, "prefix"), expected, atol=ATOL, rtol=0)
    again = make_model("llama")  # tunesmith reloads the MLP itself (training can continue)
    tunesmith.load_adapter(again, tmp_path, trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(logits(again, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["ia3", "bottleneck", "houlsby"])
def test_a_fresh_adapter_changes_nothing(arch, kind):
    model = make_model(arch)
    before = logits(model)
    config = ours("bottleneck", style="houlsby") if kind == "houlsby" else ours(kind)
    if kind == "ia3" and arch == "phi3":
        config = tunesmith.IA3Config(targets=["qkv_proj", "down_proj"], feedforward=["down_proj"])
    tunesmith.add_adapter(model, config)
    assert tunesmith.trainable_parameters(model).trainable > 0
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_bottleneck_placement_and_width():
    model = make_model("llama")
    tunesmith.add_bottleneck(model, tunesmith.BottleneckConfig(style="houlsby", reduction_factor=4))
    tunesmith.add_bottleneck(model, tunesmith.BottleneckConfig(style="pfeiffer"), name="p")
    houlsby = [n for n, _ in model.named_parameters() if ".default.down.weight" in n]
    assert [n.split(".tunesmith")[0] for n in houlsby] == [
        "model.layers.0.self_attn", "model.layers.0.mlp",
        "model.layers.1.self_attn", "model.layers.1.mlp",
    ]  # fmt: skip
    assert model.get_parameter(houlsby[0]).shape == (8, 32)  # hidden 32 / 4
    pfeiffer = [n for n, _ in model.named_parameters() if ".p.down.weight" in n]
    assert [n.split(".tunesmith")[0] for n in pfeiffer] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    gpt2 = make_model("gpt2")
    tunesmith.add_bottleneck(gpt2, tunesmith.BottleneckConfig(style="houlsby"))
    assert {n.split(".tunesmith")[0] for n, _ in gpt2.named_parameters() if "bottleneck" in n} == {
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.1.attn",
        "transformer.h.1.mlp",
    }


def test_bottleneck_format_round_trip_and_hot_swap(tmp_path):
    model = make_model("llama")
    tunesmith.add_bottleneck(
        model, tunesmith.BottleneckConfig(style="houlsby", nonlinearity="gelu")
    )
    perturb(model)
    expected = logits(model)
    tunesmith.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["format"] == "tunesmith-bottleneck"
    assert config["format_version"] == 1 and config["bottleneck_size"] == 2
    assert config["target_modules"][:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.bottleneck_"
    assert tensors[key + "down.weight"].shape == (2, 32)
    assert tensors[key + "up.weight"].shape == (32, 2) and tensors[key + "up.bias"].shape == (32,)
    fresh = make_model("llama")
    tunesmith.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)
    # hot swap: the same module objects get the new weights
    other = make_model("llama")
    tunesmith.add_bottleneck(
        other, tunesmith.BottleneckConfig(style="houlsby", nonlinearity="gelu")
    )
    params = dict(other.named_parameters())
    tunesmith.load_adapter(other, tmp_path, name="default")
    assert all(p is params[n] for n, p in other.named_parameters())
    torch.testing.assert_close(logits(other), expected, atol=0, rtol=0)
    config["format_version"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="format_version 2 is not supported"):
        tunesmith.load_adapter(make_model("llama"), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_text_init_behaves_exactly_like_prepending_the_text(arch, kind):
    model = make_model(arch)
    text = [5, 9, 11]
    ids = input_ids(batch=1, seq=6)
    with torch.no_grad():
        expected = model(input_ids=torch.cat([torch.tensor([text]), ids], 1)).logits[:, len(text) :]
    config = ours(kind, init="text", init_text="5 9 11")
    tunesmith.add_adapter(model, config, tokenizer=WordTokenizer())
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        with_mask = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(with_mask, expected, atol=ATOL, rtol=0)


def greedy_without_cache(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by a full forward per token (no generate(), no KV cache); rows that
    have produced EOS continue with padding, as generate() does."""
    config = model.generation_config
    done = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new_tokens):
            next_ids = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            next_ids = next_ids.masked_fill(done, config.pad_token_id)
            done |= next_ids == config.eos_token_id
            ids = torch.cat([ids, next_ids], 1)
    return ids


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_with_the_kv_cache(kind):
    model = make_model("llama")
    tunesmith.add_adapter(model, ours(kind, init="random"))
    perturb(model)
    ids = input_ids(batch=2, seq=5)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # PEFT, given our adapter, decodes the same tokens. Its forward is the oracle: PEFT 0.21's
    # generate() looks for `past_key_values` and `cache_position`, which transformers 5.24
    # renamed (`cache`) or dropped, so from 5.24 on it re-inserts the virtual tokens each step.
    folder = Path(__import__("tempfile").mkdtemp())
    tunesmith.save_adapter(model, folder)
    theirs = PeftModel.from_pretrained(make_model("llama"), folder).eval()
    assert torch.equal(greedy_without_cache(theirs, ids, 8), cached)
    # a left-padded batch decodes each row as it would alone
    short = ids[1, 2:]
    padded = torch.stack([ids[0], torch.cat([torch.zeros(2, dtype=torch.long), short])])
    mask = (torch.arange(5) >= torch.tensor([[0], [2]])).long()
    batch = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=0)  # fmt: skip
    alone = model.generate(short[None], max_new_tokens=6, do_sample=False)
    assert torch.equal(batch[1, 5:], alone[0, 3:])


def test_prompt_tuning_loss_is_aligned_with_the_callers_tokens():
    model = make_model("llama")
    tunesmith.add_prompt_tuning(model, ours("prompt", init="random"))
    ids = input_ids(batch=2, seq=8)
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    chunked, n = model_loss_sum(model, batch)
    full, m = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
    assert n == m == 2 * 5
    torch.testing.assert_close(chunked, full)


def test_ia3_merge_unmerge_stack_and_route(arch):
    model = make_model(arch)
    config = None
    if arch == "phi3":
        config = tunesmith.IA3Config(targets=["qkv_proj", "down_proj"], feedforward=["down_proj"])
    base = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tunesmith.add_ia3(model, config, name="a")
    tunesmith.add_ia3(model, config, name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    assert any(layer.feedforward for _, layer in ia3_layers(model))
    tunesmith.set_active(model, "a")
    only_a = logits(model)
    tunesmith.set_active(model, "b")
    only_b = logits(model)
    tunesmith.set_active(model, ["a", "b"])
    stacked = logits(model)
    tunesmith.merge(model)
    torch.testing.assert_close(logits(model), stacked, atol=ATOL, rtol=1e-5)
    tunesmith.unmerge(model)
    for name, p in model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in weights:
            torch.testing.assert_close(p, weights[clean], atol=1e-6, rtol=1e-5)
    with tunesmith.route(model, ["a", "b", None]):
        routed = logits(model)
    for row, expected in enumerate((only_a, only_b, base)):
        torch.testing.assert_close(routed[row], expected[row], atol=ATOL, rtol=1e-5)
    merged = tunesmith.merge_and_unload(model, ["a", "b"])
    assert not list(ia3_layers(merged))
    torch.testing.assert_close(logits(merged), stacked, atol=ATOL, rtol=1e-5)


# --- training through `tunesmith train` --------------------------------------------------------
METHOD_SETTINGS = {
    "prompt": ({"name": "prompt", "num_virtual_tokens": 4, "init": "random"}, 3e-1),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 4}, 1e-1),
    "prefix-mlp": (
        {
            "name": "prefix",
            "num_virtual_tokens": 4,
            "projection": True,
            "encoder_hidden_size": 16,
            "init": "random",
        },
        2e-2,
    ),  # fmt: skip
    "bottleneck": (
        {"name": "bottleneck", "style": "houlsby", "reduction_factor": 4, "dropout": 0.1},
        2e-2,
    ),  # fmt: skip
    "ia3": ({"name": "ia3"}, 1.5e-1),
}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_training_resumes_exactly(tmp_path, tiny_dir, method):  # noqa: F811
    settings, lr = METHOD_SETTINGS[method]
    steps = {"max_steps": 8, "save_every_steps": 4, "micro_batch_size": 2, "lr": lr,
             "gradient_checkpointing": True}  # fmt: skip
    straight_cfg = make_config(tmp_path / "a", tiny_dir, method=settings, train=steps)
    straight: list[float] = []
    summary = train(straight_cfg, on_step=lambda s, e: straight.append(e["loss"]), progress=quiet())
    assert summary["method"] == settings["name"]
    cfg = make_config(tmp_path / "b", tiny_dir, method=settings, train=steps)

    class Killed(Exception):
        pass

    first: list[float] = []

    def kill_at_4(step, entry):
        first.append(entry["loss"])
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_4, progress=quiet())
    assert [p.name for p in checkpoint_module.list_checkpoints(cfg.output_dir)] == ["step-000004"]
    resumed: list[float] = []
    train(cfg, resume="latest", on_step=lambda s, e: resumed.append(e["loss"]), progress=quiet())
    assert first + resumed == straight  # exact
    # the final adapter is written
    out = Path(cfg.output_dir)
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_longer_training_of_each_method_learns_the_task(tmp_path, tiny_dir):  # noqa: F811
    for method, (settings, lr) in METHOD_SETTINGS.items():
        cfg = make_config(tmp_path / method, tiny_dir, method=settings,
                          train={"max_steps": 30, "lr": lr})  # fmt: skip
        losses: list[float] = []
        train(cfg, on_step=lambda s, e, out=losses: out.append(e["loss"]), progress=quiet())
        # virtual tokens only steer a random model's attention: a smaller, still clear drop
        ratio = 0.9 if method.startswith(("prompt", "prefix")) else 0.8
        assert sum(losses[-5:]) < ratio * sum(losses[:5]), method


# --- bad settings ------------------------------------------------------------------------------
def test_zero_virtual_tokens_is_refused(tmp_path, tiny_dir):  # noqa: F811
    with pytest.raises(
        AdapterError, match="^num_virtual_tokens must be a positive integer, got 0$"
    ):
        tunesmith.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(TunesmithError, match="method.num_virtual_tokens"):
        make_config(tmp_path, tiny_dir, method={"name": "prefix", "num_virtual_tokens": 0})


def test_config_errors_name_the_problem(tmp_path, tiny_dir):  # noqa: F811
    with pytest.raises(TunesmithError, match="data.packing cannot be used with method prompt"):
        make_config(tmp_path, tiny_dir, method="prompt", data={"packing": True})
    with pytest.raises(TunesmithError, match='init "text" needs init_text'):
        make_config(tmp_path, tiny_dir, method={"name": "prompt", "init": "text"})
    with pytest.raises(TunesmithError, match="projection=true computes from an MLP"):
        make_config(tmp_path, tiny_dir, method={"name": "prefix", "projection": True})
    config = make_config(tmp_path, tiny_dir, method="ia3", train={"lr": None})
    assert config.train.lr == 3e-3  # the method's default


class NoCacheBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds


class NoCacheModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 1, "num_attention_heads": 1,
                                          "hidden_size": 8})()  # fmt: skip
        self.backbone = NoCacheBackbone()

    @property
    def base_model(self):
        return self.backbone

    def get_input_embeddings(self):
        return self.backbone.embed


def test_prefix_needs_attention_that_takes_past_key_values():
    with pytest.raises(
        AdapterError,
        match=r"^prefix tuning cannot be used with NoCacheBackbone: its attention takes no past "
        r"key/values \(forward has neither a cache nor a past_key_values argument\); use prompt "
        r"tuning or LoRA$",
    ):
        tunesmith.add_prefix_tuning(NoCacheModel())
    tunesmith.add_prompt_tuning(NoCacheModel(), ours("prompt", init="random"))  # prompt is fine


def test_adapter_errors():
    model = make_model("llama")
    tunesmith.add_prompt_tuning(model, ours("prompt", init="random"), name="p")
    tunesmith.add_prefix_tuning(model, ours("prefix"), name="q")
    with pytest.raises(AdapterError, match="only one set of virtual tokens can be active"):
        tunesmith.set_active(model, ["p", "q"])
    with pytest.raises(AdapterError, match=r"adapter 'q' \(prefix\) cannot be merged"):
        tunesmith.merge(model, ["q"])
    with pytest.raises(AdapterError, match="route\\(\\) cannot give rows different virtual"):
        with tunesmith.route(model, ["p", None, None]):
            pass
    tunesmith.add_bottleneck(model, name="b")
    with pytest.raises(AdapterError, match=r"adapter 'b' \(bottleneck\) cannot be merged"):
        tunesmith.merge(model, ["b"])
    tunesmith.add_lora(model, tunesmith.LoRAConfig(r=2, targets=["k_proj"]), name="l")
    with pytest.raises(AdapterError, match="already has LoRA adapters; LoRA and IA3 cannot share"):
        tunesmith.add_ia3(model)
    with pytest.raises(AdapterError, match="feedforward must be a subset of targets"):
        tunesmith.add_ia3(model, tunesmith.IA3Config(targets=["v_proj"], feedforward=["down_proj"]))
    with pytest.raises(AdapterError, match="reduction_factor 64 leaves no bottleneck"):
        tunesmith.add_bottleneck(model, tunesmith.BottleneckConfig(reduction_factor=64), name="c")
    for name in ("p", "q", "b", "l"):
        tunesmith.delete_adapter(model, name)
    assert virtual_tokens(model) is None
    assert not [n for n, _ in model.named_modules() if "tunesmith" in n]
    torch.testing.assert_close(logits(model), logits(make_model("llama")), atol=0, rtol=0)


def test_a_prefix_for_another_model_is_refused(tmp_path):
    model = make_model("llama")
    tunesmith.add_prefix_tuning(model, ours("prefix"))
    tunesmith.save_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match="the prefix is for 2 layers × 16 key/value dims but "
                       "GPT2LMHeadModel has 2 × 32"):  # fmt: skip
        tunesmith.load_adapter(make_model("gpt2"), tmp_path)


def test_every_method_is_in_the_schema():
    from tunesmith.config import schema_text

    text = schema_text()
    for name in ("prompt", "prefix", "bottleneck", "ia3"):
        assert f"method {name}" in text
    assert config_from_dict  # imported for make_config's users
    assert ARCHS
