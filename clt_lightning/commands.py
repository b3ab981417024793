"""Bodies of `clt evaluate`, `clt retrieve` and `clt export` (the CLI only parses).

Each command reads the same run YAML as `clt fit`: the `data:` section says which teacher
and dataset the CLT belongs to, the checkpoint gives the CLT.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_lightning.data.datasets import DatasetConfig, build_dataset
from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.evaluation.retrieval_descriptors import AGGREGATIONS, SIMILARITIES
from clt_lightning.evaluation.suite import EvaluationConfig, RunInfo, backbone_tag, run_suite
from clt_lightning.files import require_folder, require_writable_folder
from clt_lightning.teacher import Teacher, TeacherConfig

log = logging.getLogger(__name__)


@dataclass
class RetrievalConfig:
    """What `clt retrieve` builds and queries.

    Args:
        output_dir: Folder for the grid PNG and neighbours JSON (default: `<run>/retrieval`).
        index_dir: Folder of the per-layer FAISS indexes (default: `<run>/retrieval/index_<agg>`).
        query_path: An image file to query.
        query_index: Or the index of a validation image to query.
        k: Neighbours shown per layer.
        aggregation: Token aggregation of a descriptor: a token group the teacher has
            ("cls", "registers", "patches" or "all"; SigLIP has no "cls").
        similarity: "cosine" (default), "ip" or "l2".
        index_type: Force a FAISS factory string (default: chosen by size and memory budget).
        memory_budget_gb: Memory allowed for all layers' indexes together.
        batch_size: Images per teacher forward while building.
        num_workers: DataLoader workers while building.
        rebuild: Rebuild the indexes even when matching ones exist.
    """

    output_dir: str | None = None
    index_dir: str | None = None
    query_path: str | None = None
    query_index: int | None = 0
    k: int = 3
    aggregation: str = "cls"
    similarity: str = "cosine"
    index_type: str | None = None
    memory_budget_gb: float = 8.0
    batch_size: int = 64
    num_workers: int = 0
    rebuild: bool = False

    def __post_init__(self) -> None:
        for key in ("k", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"retrieval.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"retrieval.num_workers must be >= 0, got {self.num_workers}")
        if not self.memory_budget_gb > 0:  # also refuses NaN
            raise ConfigError(
                f"retrieval.memory_budget_gb must be > 0 (GiB for all layers' indexes "
                f"together), got {self.memory_budget_gb}"
            )
        if self.query_index is not None and self.query_index < 0:
            raise ConfigError(f"retrieval.query_index must be >= 0, got {self.query_index}")
        for key, valid in {"aggregation": AGGREGATIONS, "similarity": SIMILARITIES}.items():
            if getattr(self, key) not in valid:
                raise ConfigError(
                    f"retrieval.{key}={getattr(self, key)!r} is not valid; choose one of {valid}"
                )


def load_clt(ckpt_path: str | Path) -> Any:
    """The trained CrossLayerTranscoder of a `clt fit` checkpoint.

    Read weights-only and checked (`checkpointing.read_checkpoint`, then the module's
    `on_load_checkpoint`: shapes, missing tensors, NaN/Inf) before any weight is used.

    Raises:
        DataNotFoundError: No file at `ckpt_path`.
        CheckpointMismatchError: Not a readable `clt fit` checkpoint; names the file and
            what is wrong or missing.
    """
    from clt_lightning.checkpointing import read_checkpoint
    from clt_lightning.module import CLTModule

    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    accepted = inspect.signature(CLTModule.__init__).parameters
    module = CLTModule(**{k: v for k, v in hparams.items() if k in accepted})
    try:
        module.on_load_checkpoint(checkpoint)
    except CheckpointMismatchError as error:
        if str(path) in str(error):
            raise
        raise CheckpointMismatchError(f"{path}: {error}") from error
    module.load_state_dict(checkpoint["state_dict"])
    return module.clt.eval()


def check_fits_teacher(clt: Any, teacher: Teacher, ckpt_path: str | Path) -> None:
    """Refuse a checkpoint trained on another teacher, naming the file and both shapes.

    Raises:
        CheckpointMismatchError: The CLT's (n_layers, d_model) differ from the teacher's.
    """
    found, expected = (clt.n_layers, clt.d_model), (teacher.n_layers, teacher.d_model)
    if found != expected:
        raise CheckpointMismatchError(
            f"--ckpt_path {ckpt_path} holds a CLT for n_layers={found[0]}, d_model={found[1]} "
            f"but the teacher of data.teacher has n_layers={expected[0]}, "
            f"d_model={expected[1]}: use a checkpoint trained on this teacher"
        )


def run_folder(ckpt_path: str | Path) -> Path:
    """The run folder of a checkpoint: `<run>/checkpoints/x.ckpt` -> `<run>`."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def evaluate(
    teacher_config: TeacherConfig,
    dataset_config: DatasetConfig,
    ckpt_path: str,
    config: EvaluationConfig,
) -> dict[str, Any]:
    """Run the evaluation suite on the validation split; returns the written payloads."""
    folder = run_folder(ckpt_path)
    output_dir = Path(config.output_dir) if config.output_dir else folder / "evaluation"
    require_folder(output_dir, "evaluation.output_dir")
    if config.classifier_cache:
        require_folder(config.classifier_cache, "evaluation.classifier_cache")
    clt = load_clt(ckpt_path)
    teacher = Teacher(teacher_config)
    check_fits_teacher(clt, teacher, ckpt_path)
    require_writable_folder(output_dir, "evaluation.output_dir")  # creates it: checks first
    dataset = build_dataset(dataset_config, "val", teacher.preprocess)
    info = RunInfo(
        run_name=folder.name,
        dataset=dataset_config.name,
        backbone=backbone_tag(
            teacher_config.model_name if not teacher_config.model_config else None
        ),
        checkpoint=str(ckpt_path),
    )
    train = (
        None
        if teacher.has_text_tower
        else build_dataset(dataset_config, "train", teacher.preprocess)
    )
    payloads = run_suite(
        teacher, clt, dataset, list(dataset.class_names), info, config, output_dir, train
    )
    log.info("evaluation written to %s", output_dir)
    return payloads


def retrieve(
    teacher_config: TeacherConfig,
    dataset_config: DatasetConfig,
    ckpt_path: str,
    config: RetrievalConfig,
) -> Any:
    """Build (or reuse) the per-layer indexes over the train split and query one image."""
    from clt_lightning.evaluation.retrieval import build_and_query

    if config.query_path is None and config.query_index is None:
        raise ConfigError("give retrieval.query_path (an image file) or retrieval.query_index")
    folder = run_folder(ckpt_path)
    output_dir = Path(config.output_dir) if config.output_dir else folder / "retrieval"
    index_dir = config.index_dir or output_dir / f"index_{config.aggregation}"
    require_folder(output_dir, "retrieval.output_dir")
    require_folder(index_dir, "retrieval.index_dir")  # may be read-only when it is complete
    clt = load_clt(ckpt_path)
    teacher = Teacher(teacher_config)
    check_fits_teacher(clt, teacher, ckpt_path)
    require_writable_folder(output_dir, "retrieval.output_dir")  # creates it: checks first
    corpus = build_dataset(dataset_config, "train", teacher.preprocess)
    query_dataset = None
    if config.query_path is None:
        query_dataset = build_dataset(dataset_config, "val", teacher.preprocess)
    return build_and_query(
        teacher,
        clt,
        corpus,
        index_dir,
        output_dir,
        query_path=config.query_path,
        query_index=None if config.query_path else config.query_index,
        query_dataset=query_dataset,
        k=config.k,
        aggregation=config.aggregation,
        similarity=config.similarity,
        index_type=config.index_type,
        memory_budget_bytes=int(config.memory_budget_gb * 2**30),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        rebuild=config.rebuild,
    )


EXPORT_FORMATS = ("clt-lightning", "circuit-tracer")


def export(teacher_config: TeacherConfig, ckpt_path: str, output_dir: str, fmt: str) -> Path:
    """Export the checkpoint's CLT in `fmt` ("clt-lightning" or "circuit-tracer")."""
    from clt_lightning.models.circuit_tracer_export import save_circuit_tracer

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} unknown; valid: {list(EXPORT_FORMATS)}")
    clt = load_clt(ckpt_path)
    require_writable_folder(output_dir, "output_dir")
    if fmt == "clt-lightning":
        return clt.save_pretrained(output_dir)
    name = teacher_config.model_name
    if teacher_config.model_config and teacher_config.family == "open_clip":
        name = Path(teacher_config.model_config).stem
    return save_circuit_tracer(clt, output_dir, name, teacher_config.input_site)
