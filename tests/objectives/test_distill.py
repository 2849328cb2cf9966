"""Distillation: the divergences against their formulas and TRL's `generalized_jsd_loss`, the
chunked loss against whole logits, the precomputed top-k against the teacher on the fly, the
teacher checks, the planner's count of the teacher, and a student that gets closer to a tuned
teacher than the same student trained on the answers alone."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.data import chat_tokenizer
from helpers.models import save_tiny_llama
from helpers.runs import make_config, quiet
from transformers import LlamaForCausalLM

import tunesmith.train.distill as impl
from tunesmith.objectives.distill import DistillConfig
from tunesmith.objectives.distill.impl import divergence
from tunesmith.objectives.rows import TEACHER_IDS, TEACHER_LOGPS
from tunesmith.train.distill import DistillLoss
from tunesmith.train.loop import train


def logs(seed: int, n: int = 5, v: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)


def test_the_divergences_equal_their_formulas():
    s, t = logs(0), logs(1)
    ps, pt = s.exp(), t.exp()
    forward = (pt * (t - s)).sum(-1)
    reverse = (ps * (s - t)).sum(-1)
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    jsd = beta * (pt * (t - m.log())).sum(-1) + (1 - beta) * (ps * (s - m.log())).sum(-1)
    assert torch.allclose(divergence(s, t, "forward_kl"), forward)
    assert torch.allclose(divergence(s, t, "reverse_kl"), reverse)
    assert torch.allclose(divergence(s, t, "jsd", beta), jsd)
    assert torch.allclose(divergence(t, t, "jsd", beta), torch.zeros(5, dtype=torch.float64))


def test_jsd_equals_trls_generalized_jsd_loss():
    try:
        gkd = importlib.import_module("trl.experimental.gkd.gkd_trainer")
    except Exception as err:  # noqa: BLE001 - TRL is a test-only dependency
        pytest.skip(f"TRL cannot be imported here ({type(err).__name__}: {err})")
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    for beta, temperature in ((0.5, 1.0), (0.2, 2.0)):
        theirs = gkd.GKDTrainer.generalized_jsd_loss(
            student, teacher, beta=beta, temperature=temperature, reduction="sum"
        )
        s = F.log_softmax(student / temperature, -1).reshape(-1, 11)
        t = F.log_softmax(teacher / temperature, -1).reshape(-1, 11)
        ours = divergence(s, t, "jsd", beta).sum()
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


class Head(torch.nn.Module):
    """A model stand-in: `base_model` gives fixed hidden states, the head is a Linear."""

    def __init__(self, hidden: torch.Tensor, head: torch.nn.Linear):
        super().__init__()
        self.hidden, self.head = hidden, head
        self.config = type("C", (), {"model_type": "llama"})()
        self.base_model = lambda **kw: type("O", (), {"last_hidden_state": self.hidden})()

    def get_output_embeddings(self):
        return self.head


def pair(seed: int = 0, vocab: int = 13):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(2, 6, 4, generator=g) for _ in range(2)]
    heads = [torch.nn.Linear(4, vocab, bias=False) for _ in range(2)]
    for h in heads:
        torch.nn.init.normal_(h.weight, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, 7, 8, 9]])
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": labels}
    return Head(hidden[0], heads[0]), Head(hidden[1], heads[1]), batch


def whole(student, teacher, batch, cfg):
    """The loss from whole (batch, seq, vocab) logits, written out."""
    keep = batch["labels"][:, 1:] != -100
    zs = student.head(student.hidden)[:, :-1][keep]
    zt = teacher.head(teacher.hidden)[:, :-1][keep]
    s = F.log_softmax(zs / cfg.temperature, -1)
    t = F.log_softmax(zt / cfg.temperature, -1)
    div = divergence(s, t, cfg.loss, cfg.beta).sum()
    ce = F.cross_entropy(zs, batch["labels"][:, 1:][keep], reduction="sum")
    return cfg.alpha * div + (1 - cfg.alpha) * ce, int(keep.sum())


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_chunked_loss_equals_the_whole_logits_one(monkeypatch, loss):
    monkeypatch.setattr(impl, "CHUNK_ELEMENTS", 13 * 2)  # two positions per chunk
    student, teacher, batch = pair()
    cfg = DistillConfig(teacher="t", loss=loss, temperature=2.0, alpha=0.7, beta=0.4)
    total, n, metrics = DistillLoss(cfg, teacher)(student, batch)
    want, count = whole(student, teacher, batch, cfg)
    assert n == count == 8
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert set(metrics) == {"kl", "agreement", "ce"}
    total.backward()  # through the recomputed chunks
    assert student.head.weight.grad is not None


def topk_batch(teacher, batch, k):
    keep = batch["labels"][:, 1:] != -100
    top = F.log_softmax(teacher.head(teacher.hidden)[:, :-1][keep].float(), -1).topk(k)
    return {**batch, TEACHER_IDS: top.indices.int(), TEACHER_LOGPS: top.values.detach()}


def test_precomputed_top_k_of_the_whole_vocabulary_equals_the_teacher_on_the_fly():
    student, teacher, batch = pair(1)
    cfg = DistillConfig(teacher="t", loss="jsd", temperature=1.5)
    live, _, _ = DistillLoss(cfg, teacher)(student, batch)
    stored, _, _ = DistillLoss(cfg, None)(student, topk_batch(teacher, batch, 13))
    assert float(stored.detach()) == pytest.approx(float(live.detach()), rel=1e-5)


def test_precomputed_top_k_renormalises_both_distributions_on_the_kept_tokens():
    student, teacher, batch = pair(2)
    cfg = DistillConfig(teacher="t", loss="forward_kl")
    b = topk_batch(teacher, batch, 3)
    got, _, _ = DistillLoss(cfg, None)(student, b)
    keep = batch["labels"][:, 1:] != -100
    s = F.log_softmax(student.head(student.hidden)[:, :-1][keep], -1).gather(
        -1, b[TEACHER_IDS].long()
    )
    s = s - s.logsumexp(-1, keepdim=True)
    t = b[TEACHER_LOGPS] - b[TEACHER_LOGPS].logsumexp(-1, keepdim=True)
    assert float(got.detach()) == pytest.approx(float((t.exp() * (t - s)).sum()), rel=1e-5)


def tiny(folder: Path, seed: int, vocab_extra: bool = False) -> Path:
    tokenizer = chat_tokenizer()
    if vocab_extra:
        tokenizer.add_tokens(["<extra_token>"])
    return save_tiny_llama(folder, tokenizer, seed)


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path, tiny_dir):
    other = tiny(tmp_path / "other", 1, vocab_extra=True)
    cfg = make_config(tmp_path, tiny_dir, objective={"name": "distill", "teacher": str(other)})
    with pytest.raises(Exception) as err:
        train(cfg, progress=quiet())
    assert str(err.value) == (
        f"objective.teacher: {other} uses another tokenizer than the student (4097 vs 4096 "
        "tokens, 1 entries differ); distillation compares the two distributions token by "
        "token, so pick a teacher of the student's family"
    )
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_the_planner_counts_the_teacher_unless_its_top_k_is_precomputed(tmp_path, tiny_dir):
    from tunesmith.plan.planner import plan_run

    teacher = tiny(tmp_path / "teacher", 2)
    sft = plan_run(make_config(tmp_path, tiny_dir))
    live = plan_run(
        make_config(tmp_path, tiny_dir, objective={"name": "distill", "teacher": str(teacher)})
    )
    stored = plan_run(
        make_config(
            tmp_path,
            tiny_dir,
            objective={"name": "distill", "teacher": str(teacher), "precompute_teacher": True},
        )
    )
    model = LlamaForCausalLM.from_pretrained(teacher)
    tensors = [*model.parameters(), *model.buffers()]
    teacher_bytes = sum(t.numel() * 4 for t in tensors)  # fp32: the run's model.dtype
    assert live.traced.weights_bytes - sft.traced.weights_bytes == teacher_bytes
    assert stored.traced.weights_bytes == sft.traced.weights_bytes
    assert any("the teacher" in note and "time ×" in note for note in live.notes)
    assert any("computed once before training" in note for note in stored.notes)


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory, tiny_dir):
    """A tuned teacher (the tiny model trained in full on the toy task) and the runs of one
    student: distilled from it, and trained on the answers alone."""
    tmp = tmp_path_factory.mktemp("distill")
    teach = make_config(
        tmp / "t", tiny_dir, method={"name": "full"}, train={"max_steps": 60, "lr": 3e-3}
    )
    train(teach, progress=quiet())
    teacher = Path(teach.output_dir) / "model"
    student = tiny(tmp / "student", 5)
    common = {"train": {"max_steps": 60, "lr": 3e-3}, "method": {"name": "full"}}
    distilled = make_config(
        tmp / "d", student, objective={"name": "distill", "teacher": str(teacher)}, **common
    )
    sft = make_config(tmp / "s", student, **common)
    return teacher, train(distilled, progress=quiet()), train(sft, progress=quiet()), sft, tmp


def agreement_with(teacher: Path, run_config, output: Path) -> dict:
    """The student's divergence and agreement with the teacher on the validation data."""
    from tunesmith.builder import load_for_inference
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer
    from tunesmith.train.loss import autocast_for
    from tunesmith.train.objective import evaluate_units

    model, _, _ = load_for_inference(str(output), [], "cpu", "fp32")  # a full fine-tune
    teacher_model, _, _ = load_for_inference(str(teacher), [], "cpu", "fp32")
    tokenizer = load_tokenizer(run_config.model)
    data = prepare_data(run_config.data, tokenizer)
    loss = DistillLoss(DistillConfig(teacher=str(teacher)), teacher_model)
    autocast = lambda: autocast_for("cpu", torch.float32)  # noqa: E731
    return evaluate_units(loss, model, data.validation, 4, 0, "cpu", autocast)


def test_a_distilled_student_gets_closer_to_the_teacher_than_one_trained_on_answers(
    teacher_and_student,
):
    teacher, distilled, sft, sft_config, tmp = teacher_and_student
    start = json.loads((tmp / "d/out/metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and distilled["final_val_kl"] < start["val_kl"]
    answers_only = agreement_with(teacher, sft_config, Path(sft["output"]))
    assert distilled["final_val_kl"] < answers_only["val_kl"]
    assert distilled["final_val_agreement"] > answers_only["val_agreement"]


def test_a_precomputed_teacher_is_kept_with_the_data_and_a_resumed_run_matches(tmp_path, tiny_dir):
    import shutil

    from safetensors.torch import load_file

    teacher = tiny(tmp_path / "teacher", 3)
    objective = {"name": "distill", "teacher": str(teacher), "precompute_teacher": True}
    cfg = make_config(
        tmp_path, tiny_dir, objective=objective, train={"max_steps": 4, "save_every_steps": 2}
    )
    lines = []
    progress = quiet()
    progress.log = lines.append
    train(cfg, progress=progress)
    assert any(line.startswith("teacher top-64: computed for") for line in lines)
    out = Path(cfg.output_dir)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints/step-000004")
    shutil.rmtree(again / "adapter")
    lines.clear()
    resumed = cfg.model_copy(update={"output_dir": str(again)})
    train(resumed, resume="latest", progress=progress)
    assert any(line.startswith("teacher top-64: read from") for line in lines)
    first = load_file(out / "adapter/adapter_model.safetensors")
    second = load_file(again / "adapter/adapter_model.safetensors")
    for key in first:
        assert torch.equal(first[key], second[key]), key
