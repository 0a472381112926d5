"""PH2: 200 dermoscopic images of melanocytic lesions (common nevus, atypical nevus, melanoma).

    PH2Dataset/PH2_dataset.txt
    PH2Dataset/PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp

`PH2_dataset.txt` is a table with `||` between column groups and `|` inside the group of
dermoscopic criteria; some rows leave criteria blank, and a block of legends follows the rows.
PH2 has no official split; being small, it is split by mvit and suits k-fold cross-validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mvit.registry import DatasetError, DatasetSpec, HeadSpec, Sample, hookimpl, is_image

TABLE = "PH2_dataset.txt"
IMAGES = "PH2 Dataset images"
DIAGNOSES = {"0": "common_nevus", "1": "atypical_nevus", "2": "melanoma"}  # Clinical Diagnosis codes
LABELS = tuple(DIAGNOSES.values())
LAYOUT = f"PH2Dataset/{TABLE} and PH2Dataset/{IMAGES}/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp"


def dataset_dir(root: Path) -> Path:
    """The PH2Dataset folder: `root` itself or `root/PH2Dataset`."""
    for candidate in (root, root / "PH2Dataset"):
        if (candidate / TABLE).is_file():
            return candidate
    raise DatasetError(f"{root} has no {TABLE} (nor PH2Dataset/{TABLE}); the dataset folder must hold {LAYOUT}")


def check_layout(root: Path) -> None:
    images = dataset_dir(root) / IMAGES
    if not images.is_dir():
        raise DatasetError(f"{images} is missing; the dataset folder must hold {LAYOUT}")


def image_path(base: Path, name: str) -> Path:
    return base / IMAGES / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp"


def parse_table(path: Path) -> list[dict[str, Optional[str]]]:
    """The rows of PH2_dataset.txt as {column: value}; a blank cell is None. Stops at the legends."""
    rows: list[dict[str, Optional[str]]] = []
    header: Optional[list[str]] = None
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip().startswith("||"):
            if header is not None and rows and line.strip():
                break  # the legend block after the rows
            continue
        cells = _cells(line)
        if header is None:
            header = [cell or "" for cell in cells]
            for column in ("Name", "Clinical Diagnosis"):
                if column not in header:
                    raise DatasetError(f"{path} line {number}: the header has no {column!r} column; is it PH2_dataset.txt?")
            continue
        if len(cells) != len(header):
            raise DatasetError(
                f"{path} line {number} has {len(cells)} cells where the header has {len(header)}; fix the row"
            )
        rows.append({"line": str(number), **dict(zip(header, cells))})
    if header is None:
        raise DatasetError(f"{path} has no `||` table header; is it PH2_dataset.txt?")
    return rows


def _cells(line: str) -> list[Optional[str]]:
    # "|| a || b || c | d | e || f ||" -> ["a", "b", "c", "d", "e", "f"]; the outer || are fences
    inner = line.strip()[2:]
    inner = inner[:-2] if inner.endswith("||") else inner
    return [cell.strip() or None for group in inner.split("||") for cell in group.split("|")]


def load(root: Path) -> list[Sample]:
    base = dataset_dir(root)
    table = base / TABLE
    samples = []
    for row in parse_table(table):
        name, code = row["Name"], row["Clinical Diagnosis"]
        if not name:
            raise DatasetError(f"{table} line {row['line']} has no image name; fill it in or remove the row")
        if code not in DIAGNOSES:
            raise DatasetError(
                f"{table} line {row['line']}: Clinical Diagnosis {code!r} for {name} is not 0, 1 or 2; fix the row"
            )
        meta = {key: value for key, value in row.items() if key not in ("Name", "line")}
        colors = (row.get("Colors") or "").split()  # "3  4" -> [3, 4]
        if not all(color.isdigit() for color in colors):
            raise DatasetError(f"{table} line {row['line']}: Colors {row['Colors']!r} is not a list of codes 1-6")
        meta["Colors"] = [int(color) for color in colors]
        samples.append(Sample(path=image_path(base, name), label=DIAGNOSES[code], group=name, meta=meta))
    return samples


def find_images(root: Path) -> list[Path]:
    # only the dermoscopic images: lesion masks and ROIs sit next to them in the official layout
    base = dataset_dir(root) / IMAGES
    return sorted(p for p in base.glob("*/*_Dermoscopic_Image/*") if p.is_file() and is_image(p))


CITATION = (
    "Mendonca T, Ferreira PM, Marques JS, Marcal ARS, Rozeira J. PH2 - A dermoscopic image database for research "
    "and benchmarking. 35th Annual Int. Conf. IEEE EMBS (EMBC), 2013, pp. 5437-5440. doi:10.1109/EMBC.2013.6610779"
)


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="ph2",
            title="PH2: dermoscopic images of melanocytic lesions (Hospital Pedro Hispano)",
            citation=CITATION,
            license="research use only, with citation",
            homepage="https://www.fc.up.pt/addi/ph2%20database.html",
            labels=LABELS,
            diagnoses={label: label for label in LABELS},  # PH2's labels are vocabulary terms as they are
            layout=LAYOUT,
            load=load,
            check_layout=check_layout,
            find_images=find_images,
        )
    )


@hookimpl
def register_heads(register):
    register(
        HeadSpec(
            name="ph2",
            dataset="ph2",
            classes=LABELS,
            description="PH2 clinical diagnosis: common nevus, atypical nevus or melanoma.",
        )
    )
    register(
        HeadSpec(
            name="ph2-mel",
            dataset="ph2",
            classes=("melanoma", "not_melanoma"),
            label_map={"common_nevus": "not_melanoma", "atypical_nevus": "not_melanoma"},
            positive="melanoma",
            description="Melanoma or not, trained on PH2.",
        )
    )
