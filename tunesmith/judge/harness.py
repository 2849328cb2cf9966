"""`tunesmith bench`: benchmark tasks through EleutherAI's lm-evaluation-harness (the `bench`
extra) for the base model and each adapter side by side. The harness gets the model object
itself, with the adapter attached in memory (no merge, no temporary checkpoint); its results
JSON is written per model, with a table of every task's metrics.

The bundled task `tunesmith_words` (tasks/, JSONL + task YAML) runs offline; any harness task
name (arc_easy, mmlu, …) works where the hub can be reached. Task folders given with
`--include` may name their data files relative to the YAML file.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunesmith.builder import build_model, run_dtypes
from tunesmith.config import RunConfig
from tunesmith.data.templates import resolve_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.io import atomic_write_json, atomic_write_text
from tunesmith.judge.evaluate import adapter_label, measure_folder
from tunesmith.models import load_tokenizer, resolve_device

BUNDLED_TASKS = Path(__file__).resolve().parent / "tasks"
TABLE_FILE = "table.json"


@dataclass
class BenchColumn:
    name: str
    results: dict
    """The harness's own output of `simple_evaluate` (JSON-serializable)."""


def _local_tasks(folders: list[Path], work: Path) -> Path:
    """Copy task YAMLs into `work`, making relative `dataset_kwargs.data_files` absolute
    against each YAML's own folder (the harness resolves them against the working directory)."""
    for folder in folders:
        if not folder.is_dir():
            raise TunesmithError(f"--include {folder}: no such folder of task YAML files")
        for source in sorted(folder.glob("*.yaml")):
            text = source.read_text(encoding="utf-8")
            config = yaml.safe_load(text)
            files = (config or {}).get("dataset_kwargs", {}).get("data_files")
            if isinstance(files, dict):
                for split, name in files.items():
                    if isinstance(name, str) and not Path(name).is_absolute():
                        files[split] = str((source.parent / name).resolve())
                text = yaml.safe_dump(config, sort_keys=False)
            target = work / f"{folder.name}-{source.name}"
            target.write_text(text, encoding="utf-8")
    return work


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as err:
        raise TunesmithError(
            f"tunesmith bench needs lm-evaluation-harness ({err.name} is missing): "
            'pip install -e ".[bench]"'
        ) from None
    return lm_eval, HFLM, TaskManager, handle_non_serializable


def run_bench(
    config: RunConfig,
    tasks: list[str],
    adapters: list[str],
    *,
    include: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    chat_template: bool | None = None,
    include_base: bool = True,
    seed: int = 1234,
) -> list[BenchColumn]:
    """Run harness `tasks` on the base and each adapter (or fully fine-tuned model) folder.
    `chat_template`: wrap prompts in the run's chat template (None: when it has one)."""
    lm_eval, hflm, task_manager_class, serializable = _harness()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns about model objects
    tokenizer = load_tokenizer(config.model)
    template, _ = resolve_chat_template(config.data.chat_template, tokenizer, {"chat"})
    if chat_template is None:
        chat_template = bool(template)
    if chat_template:
        if not template:
            raise TunesmithError(
                "--chat-template: the tokenizer has no chat template; set data.chat_template"
            )
        tokenizer.chat_template = template  # the template training used
    device = resolve_device(config.model.device)
    dtype = run_dtypes(config, device).compute
    model = build_model(
        config.method,
        model=config.model,
        train=config.train,
        device=device,
        compute_dtype=dtype,
        attach=False,
        training=False,
    ).eval()

    with tempfile.TemporaryDirectory(prefix="tunesmith-tasks-") as work:
        folders = [BUNDLED_TASKS] + [Path(p) for p in include or []]
        manager = task_manager_class(include_path=str(_local_tasks(folders, Path(work))))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise TunesmithError(
                f"--tasks: unknown task(s) {', '.join(unknown)}; bundled: tunesmith_words; "
                "see `lm_eval ls tasks` for the harness's, or --include a folder of task YAMLs"
            )

        def evaluate(m) -> dict:
            lm = hflm(pretrained=m, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                apply_chat_template=chat_template,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            return json.loads(json.dumps(results, default=serializable))

        columns = [BenchColumn("base", evaluate(model))] if include_base else []
        for i, folder in enumerate(adapters):
            columns.append(
                BenchColumn(
                    adapter_label(folder),
                    measure_folder(config, model, folder, f"b{i}", (device, dtype), evaluate),
                )
            )
    return columns


def bench_table(columns: list[BenchColumn]) -> dict:
    """{"header": [...], "rows": [[task, metric, value per column]]}: every metric the harness
    reports (with its standard error), in its order."""
    header = ["task", "metric"] + [c.name for c in columns]
    rows = []
    if not columns:
        return {"header": header, "rows": rows}
    first = columns[0].results["results"]
    for task, metrics in first.items():
        for key, value in metrics.items():
            if not isinstance(value, int | float) or key.endswith("_stderr,none") or "," not in key:
                continue
            stderr_key = key.replace(",", "_stderr,", 1)
            cells = []
            for column in columns:
                result = column.results["results"].get(task, {})
                v, se = result.get(key), result.get(stderr_key)
                if not isinstance(v, int | float):
                    cells.append("-")
                elif isinstance(se, int | float):
                    cells.append(f"{v:.4f} ± {se:.4f}")
                else:
                    cells.append(f"{v:.4f}")
            rows.append([task, key.split(",")[0], *cells])
    return {"header": header, "rows": rows}


def format_bench_table(table: dict) -> str:
    widths = [
        max(len(str(x)) for x in col) for col in zip(table["header"], *table["rows"], strict=True)
    ]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(table["header"], widths, strict=True))]
    for row in table["rows"]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def write_bench(columns: list[BenchColumn], out: Path) -> list[Path]:
    """Each model's harness JSON as out/NAME.json, the table as out/table.json (and .txt)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        atomic_write_json(c.results, out / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', c.name)}.json")
        for c in columns
    ]
    table = bench_table(columns)
    written.append(atomic_write_json(table, out / TABLE_FILE))
    written.append(atomic_write_text(format_bench_table(table) + "\n", out / "table.txt"))
    return written


__all__ = [
    "BUNDLED_TASKS",
    "BenchColumn",
    "bench_table",
    "format_bench_table",
    "run_bench",
    "write_bench",
]
