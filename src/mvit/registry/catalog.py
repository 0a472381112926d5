"""What the loaded plugins offer: their datasets and heads, the plugin behind each, and the
plugins that were skipped; look-ups that name what exists when a name is wrong."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Optional

from mvit.errors import PluginError
from mvit.registry.specs import DatasetSpec, HeadSpec
from mvit.registry.words import nearest


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its entry-point name, the distribution that installed it, what it offers."""

    name: str
    distribution: str
    version: str
    datasets: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()


DEBUG_ENV = "MVIT_DEBUG"  # set to 1: plugin failures keep their traceback, for the plugin's author


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class PluginWarning:
    """Something of a plugin that was skipped (the whole plugin, or one of its heads), and why, in one
    sentence. `error`: an installation to fix (two plugins claim one name); `warning`: a plugin bug."""

    plugin: str
    distribution: str
    message: str
    skipped: str = "plugin"  # what was left out: "plugin", or "head 'NAME'"
    level: Literal["error", "warning"] = "warning"
    traceback: Optional[str] = None  # the plugin's own traceback, shown with MVIT_DEBUG=1

    def sentence(self) -> str:
        source = f" ({self.distribution})" if self.distribution else ""
        what = "plugin" if self.skipped == "plugin" else f"{self.skipped} of plugin"
        return f"{what} {self.plugin!r}{source} skipped: {self.message}"


@dataclass
class Registry:
    """What the loaded plugins offer, with the plugin behind each dataset and head."""

    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    heads: dict[str, HeadSpec] = field(default_factory=dict)
    provider: dict[str, PluginInfo] = field(default_factory=dict)  # "dataset:NAME" / "head:NAME" -> plugin
    warnings: list[PluginWarning] = field(default_factory=list)
    # "dataset:NAME" / "head:NAME" / "plugin:NAME" -> why it is installed but not offered
    skipped: dict[str, str] = field(default_factory=dict)
    # dataset -> {head: why}: heads registered for a dataset but skipped, so that a run on the dataset
    # is not silently missing them
    lost: dict[str, dict[str, str]] = field(default_factory=dict)

    def get_dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise PluginError(self._missing("dataset", name, self.datasets))
        return self.datasets[name]

    def get_head(self, name: str) -> HeadSpec:
        if name not in self.heads:
            raise PluginError(self._missing("head", name, self.heads))
        return self.heads[name]

    def _missing(self, kind: str, name: str, known: Iterable[str]) -> str:
        """Why `name` is not offered: installed but skipped (and why), or unknown (and what is near)."""
        reason = self.skipped.get(f"{kind}:{name}") or self.skipped.get(f"plugin:{name}")
        if reason is not None:
            return f"the {kind} {name!r} is installed but skipped: {reason}"
        names = sorted(known)
        near = nearest(name, names)
        hint = f"did you mean {near!r}? " if near else ""
        skipped = sum(key.startswith("plugin:") for key in self.skipped)
        also = f"; {skipped} installed plugin{'s were' if skipped > 1 else ' was'} skipped" if skipped else ""
        return (
            f"no installed plugin offers a {kind} named {name!r}; {hint}known {kind}s: {', '.join(names) or 'none'}"
            f"{also} (run `mvit plugins` to see what is installed)"
        )

    def heads_of(self, dataset: str) -> list[HeadSpec]:
        return [head for head in self.heads.values() if head.dataset == dataset]

    def lost_heads(self, dataset: str) -> dict[str, str]:
        """The heads a plugin registered for `dataset` that loading skipped: head name -> why."""
        return dict(self.lost.get(dataset, {}))

    def plugin_of(self, kind: str, name: str) -> PluginInfo:
        """The plugin that registered dataset or head `name` (`kind` is "dataset" or "head")."""
        return self.provider[f"{kind}:{name}"]

    def as_dict(self) -> dict[str, Any]:
        """Everything `mvit plugins --format json` shows: plain JSON types, sorted by name."""
        return {
            "plugins": [asdict(info) for _, info in sorted(self.plugins.items())],
            "datasets": [
                {
                    **spec.model_dump(exclude={"load", "check_layout", "find_images"}),
                    "plugin": self.plugin_of("dataset", name).name,
                    "heads": sorted(head.name for head in self.heads_of(name)),
                }
                for name, spec in sorted(self.datasets.items())
            ],
            "heads": [
                {**spec.model_dump(), "plugin": self.plugin_of("head", name).name}
                for name, spec in sorted(self.heads.items())
            ],
            "warnings": [
                {key: value for key, value in asdict(warning).items() if key != "traceback" or debugging()}
                for warning in self.warnings
            ],
        }
