"""A small shared diagnosis vocabulary, and the bridge from one dataset's labels to another's head.

Datasets name the same diagnosis differently: melanoma is `mel` in HAM10000, `melanoma` in PH2 and
the folder `Melanoma` in DermMel. A plugin says once what each of its labels means in these terms
(`DatasetSpec.diagnoses`), and any head can then be evaluated on any dataset that did so.

Why a vocabulary declared per dataset, rather than matching the head's class names or pairwise maps:

- Class names are the head author's words, not facts: `ham10000`'s class `nv` and `ph2`'s classes
  `common_nevus` / `atypical_nevus` share no name, yet every PH2 nevus is a HAM10000 `nv`; and a
  class named `other` in two heads need not mean the same thing. Knowing that takes a vocabulary
  that says what is part of what (`nevus` = `common_nevus` + `atypical_nevus`).
- A plugin declares its own labels once, against this list, so n datasets need n declarations
  instead of a map for every pair of plugins, and a new plugin is cross-evaluable with the rest
  the moment it is installed.
- Heads need no change: a head's classes are already defined by its `label_map` over its own
  dataset's labels, so each class stands for the diagnoses of the labels it receives.

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

from typing import TYPE_CHECKING, Optional

from mvit.errors import ConfigError

if TYPE_CHECKING:  # specs imports this module to validate declarations
    from mvit.registry.specs import DatasetSpec, HeadSpec

# The leaves: diagnoses the built-in datasets tell apart. A label declares one or more of them.
LEAVES: dict[str, str] = {
    "melanoma": "melanoma, in situ or invasive",
    "common_nevus": "melanocytic nevus, clinically common (banal)",
    "atypical_nevus": "melanocytic nevus, clinically atypical (dysplastic)",
    "basal_cell_carcinoma": "basal cell carcinoma",
    "squamous_cell_carcinoma": "invasive squamous cell carcinoma",
    "actinic_keratosis": "actinic keratosis and intraepithelial carcinoma (Bowen's disease)",
    "benign_keratosis": "seborrhoeic keratosis, solar lentigo or lichen planus-like keratosis",
    "dermatofibroma": "dermatofibroma",
    "vascular_lesion": "angioma, angiokeratoma, pyogenic granuloma or haemorrhage",
}
# Groups: a coarser term is the union of finer ones (a dataset that does not tell them apart uses it).
GROUPS: dict[str, tuple[str, ...]] = {
    "nevus": ("common_nevus", "atypical_nevus"),
}
TERMS: frozenset[str] = frozenset(LEAVES) | frozenset(GROUPS)


def leaves(*terms: str) -> frozenset[str]:
    """The leaf diagnoses the terms stand for. Unknown terms raise ValueError."""
    found: set[str] = set()
    for term in terms:
        if term in LEAVES:
            found.add(term)
        elif term in GROUPS:
            found |= leaves(*GROUPS[term])
        else:
            raise ValueError(f"{term!r} is not in mvit's diagnosis vocabulary ({', '.join(sorted(TERMS))})")
    return frozenset(found)


def other_than(*terms: str) -> tuple[str, ...]:
    """Every leaf diagnosis but these: what a "not melanoma" label means (`other_than("melanoma")`)."""
    excluded = leaves(*terms)
    return tuple(leaf for leaf in LEAVES if leaf not in excluded)


def classes_meaning(head: "HeadSpec", head_dataset: "DatasetSpec", meanings: dict[str, tuple[str, ...]]) -> dict[str, Optional[str]]:
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


def bridge_label_map(head: "HeadSpec", head_dataset: "DatasetSpec", dataset: "DatasetSpec") -> dict[str, Optional[str]]:
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
