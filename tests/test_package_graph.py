"""The package's shape holds: no import cycles between packages or modules, no method-type
dispatch outside the method folders, no private name imported across modules, and imports
inside functions only where the reason below applies (measured by bench/package_graph.py)."""

from __future__ import annotations

import importlib.util

from helpers.runs import ROOT

spec = importlib.util.spec_from_file_location("package_graph", ROOT / "bench/package_graph.py")
graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(graph)

LAZY = {
    "bitsandbytes": "an optional extra (pip install -e .[bnb])",
    "lm_eval": "an optional extra (pip install -e .[bench])",
    "torch.utils.tensorboard": "an optional extra (pip install -e .[tensorboard])",
    "wandb": "an optional extra (pip install -e .[wandb])",
    "mlflow": "an optional extra (pip install -e .[mlflow])",
    "datasets": "heavy; only for hub datasets",
    "pyarrow": "heavy; only for parquet files",
    "matplotlib": "heavy; only for loss plots",
    "fcntl": "POSIX only",
    **dict.fromkeys(
        (
            "liger_kernel.ops.fused_linear_cross_entropy",
            "liger_kernel.ops.rms_norm",
            "liger_kernel.ops.rope",
            "liger_kernel.ops.swiglu",
        ),
        "an optional extra (pip install -e .[gpu]); it imports Triton",
    ),
    **dict.fromkeys(
        ("lm_eval.models.huggingface", "lm_eval.tasks", "lm_eval.utils"),
        "an optional extra (pip install -e .[bench])",
    ),
    "pyarrow.parquet": "heavy; only for parquet files",
    "matplotlib.pyplot": "heavy; only for loss plots",
    "mlflow.entities": "an optional extra (pip install -e .[mlflow])",
    "torch._dynamo": "only with train.compile",
    "rouge_score": "heavy (nltk, scipy: a second at every start); only for scores",
    "sacrebleu": "heavy; only for generation scores",
    "tunesmith.plan.planner": "jobs.py: 0.7 s at every start; asked on a GPU and in benchmarks",
    "huggingface_hub": "only when a model is a hub id",
    "optuna.visualization": "sweep.py: imports matplotlib; only when a sweep worker finishes",
    **dict.fromkeys(
        (
            "onnx",
            "onnxruntime",
            "onnxruntime.quantization",
            "onnxruntime.quantization.matmul_nbits_quantizer",
            "onnxruntime_genai",
        ),
        "an optional extra (pip install -e .[onnx])",
    ),
    "llguidance.torch": "serve/engine.py: imports torch._dynamo (most of a second at every "
    "server start); only for response_format",
    "torch": "data/pack.py: `tunesmith config check` and the data pipeline run without torch",
    "safetensors.torch": "io.py: the same (it imports torch)",
}
"""Function-level imports outside cli/, and why each is lazy. cli/ imports each command's
modules inside the command, so that `tunesmith --help` does not load torch."""


def test_no_cycles_no_dispatch_outside_methods_no_private_imports():
    found = graph.measure()
    assert found["package_cycles"] == []
    assert found["module_cycles"] == []
    assert found["method_dispatch_outside_methods"] == []
    assert found["private_imports_across_modules"] == []


def test_imports_inside_functions_only_where_they_must_be():
    found = graph.measure()
    unexplained = [
        line
        for line in found["function_level_imports"]
        if not line.startswith("tunesmith/cli/")
        and line.split(": ", 1)[1] not in LAZY  # the exact module: torch.nn is not "torch"
    ]
    assert unexplained == []


def test_help_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, tunesmith.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.stdout.split() == ["False", "False"]


def documented_layers() -> list[tuple[str, list[str]]]:
    """The layers table of docs/architecture.md: (layer, its units as the graph names them:
    `plan/` is "plan", `builder.py` is "builder.py", `errors` is "errors.py")."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n| layer |", 1)[1].split("\n\n", 1)[0]
    layers = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        units = re.findall(r"`([^`]+)`", cells[1])
        names = [
            u.rstrip("/") if u.endswith("/") else u if u.endswith(".py") else u + ".py"
            for u in units
        ]
        layers.append((cells[0], names))
    return layers


def test_imports_point_down_the_documented_layers():
    """Every unit of the package is in the documented table, and every import between units
    points to the same layer or one below it (the package root and __main__ sit on top)."""
    layers = documented_layers()
    rank = {unit: i for i, (_, units) in enumerate(layers) for unit in units}
    edges = graph.measure()["package_edges"]
    top = {"tunesmith", "__main__.py"}
    units = {u for u, targets in edges.items() for u in (u, *targets)} - top
    assert sorted(units - set(rank)) == []  # every unit documented
    upward = [
        f"{unit} ({layers[rank[unit]][0]}) -> {target} ({layers[rank[target]][0]})"
        for unit, targets in edges.items()
        if unit not in top
        for target in targets
        if target not in top and rank[target] > rank[unit]
    ]
    assert upward == []
