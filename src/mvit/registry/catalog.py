"""What the loaded plugins offer: their datasets and heads, the plugin behind each, and the
plugins that were skipped; look-ups that name what exists when a name is wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from mvit.errors import PluginError
from mvit.registry.specs import DatasetSpec, HeadSpec


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its entry-point name, the distribution that installed it, what it offers."""

    name: str
    distribution: str
    version: str
    datasets: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginWarning:
    """A plugin that was skipped, and why, in one sentence."""

    plugin: str
    distribution: str
    message: str


@dataclass
class Registry:
    """What the loaded plugins offer, with the plugin behind each dataset and head."""

    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    heads: dict[str, HeadSpec] = field(default_factory=dict)
    provider: dict[str, PluginInfo] = field(default_factory=dict)  # "dataset:NAME" / "head:NAME" -> plugin
    warnings: list[PluginWarning] = field(default_factory=list)

    def get_dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise PluginError(_unknown("dataset", name, self.datasets))
        return self.datasets[name]

    def get_head(self, name: str) -> HeadSpec:
        if name not in self.heads:
            raise PluginError(_unknown("head", name, self.heads))
        return self.heads[name]

    def heads_of(self, dataset: str) -> list[HeadSpec]:
        return [head for head in self.heads.values() if head.dataset == dataset]

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
            "warnings": [asdict(warning) for warning in self.warnings],
        }


def _unknown(kind: str, name: str, known: Iterable[str]) -> str:
    names = ", ".join(sorted(known)) or "none"
    return (
        f"no installed plugin offers a {kind} named {name!r}; known {kind}s: {names} "
        f"(run `mvit plugins` to see what is installed)"
    )
