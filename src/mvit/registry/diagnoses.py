"""A small shared diagnosis vocabulary: what each dataset's labels mean, in shared terms.

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

A head's classes for another dataset's labels, by these declarations, are `mvit.datasets.bridging`.
"""

from __future__ import annotations



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
