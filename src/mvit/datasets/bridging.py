"""Another dataset's labels as a head's classes, through the diagnosis vocabulary
(`mvit.registry.diagnoses`), so any head can be evaluated on any dataset that declared its labels.

The bridge (`bridge_label_map`): each vocabulary term stands for a set of leaf diagnoses, a head
class for the union of its labels' sets. A label of the other dataset maps to the head class whose
diagnoses it shares, when it shares diagnoses with exactly one class of the head; it is left out
when it shares none (a basal cell carcinoma has no counterpart in a head trained on nevi and
melanomas) or several (HAM10000's `nv` is both of the PH2 head's nevus classes). So DermMel's
`NotMelanoma` (every diagnosis but melanoma) lands in `ham10000-mel`'s `not_melanoma`, while it
matches six classes of the seven-class `ham10000` head and is left out there.

A dataset whose plugin declares no diagnoses (third-party plugins written before this existed)
still works everywhere else; only evaluating another dataset's head on it, or its head on another
dataset, is refused, with a sentence saying why.
"""

from __future__ import annotations

from typing import Optional

from mvit.errors import ConfigError
from mvit.registry.diagnoses import leaves
from mvit.registry.specs import DatasetSpec, HeadSpec


def classes_meaning(head: HeadSpec, head_dataset: DatasetSpec, meanings: dict[str, tuple[str, ...]]) -> dict[str, Optional[str]]:
    """Label -> the class of `head` (trained on `head_dataset`) whose diagnoses the label's meaning
    (vocabulary terms) shares with exactly one class of the head, else None."""
    covered: dict[str, set[str]] = {cls: set() for cls in head.classes}  # head class -> its leaf diagnoses
    for label in head_dataset.labels:
        cls = head.class_of(label)
        if cls is not None and label in head_dataset.diagnoses:
            covered[cls] |= leaves(*head_dataset.diagnoses[label])
    mapping: dict[str, Optional[str]] = {}
    for label, terms in meanings.items():
        meaning = leaves(*terms)
        sharing = [cls for cls in head.classes if covered[cls] & meaning]
        mapping[label] = sharing[0] if len(sharing) == 1 else None
    return mapping


def bridge_label_map(head: HeadSpec, head_dataset: DatasetSpec, dataset: DatasetSpec) -> dict[str, Optional[str]]:
    """Label of `dataset` -> the class of `head` (trained on `head_dataset`) it means, or None.

    The head's own dataset gets the head's own `label_map`. Raises ConfigError, one sentence, when
    either dataset declares no diagnoses, or when no label of `dataset` maps onto a class.
    """
    if dataset.name == head.dataset:
        return {label: head.class_of(label) for label in dataset.labels}
    for spec in (dataset, head_dataset):
        if not spec.diagnoses:
            raise ConfigError(
                f"head {head.name} cannot be evaluated on {dataset.name}: the {spec.name} plugin does not declare what "
                f"its labels mean in mvit's diagnosis vocabulary (DatasetSpec.diagnoses, see docs/plugins.md); evaluate "
                f"the head on {head.dataset}, or add the declaration to the plugin"
            )
    mapping = classes_meaning(head, head_dataset, {label: dataset.diagnoses.get(label, ()) for label in dataset.labels})
    if not any(mapping.values()):
        raise ConfigError(
            f"no label of {dataset.name} ({', '.join(dataset.labels)}) matches exactly one class of head {head.name} "
            f"({', '.join(head.classes)}), so the head cannot be evaluated on it; choose a head whose classes "
            f"{dataset.name}'s diagnoses fall into"
        )
    return mapping
