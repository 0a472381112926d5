"""The dataset engine: folders read through their plugins, split, checked for shared images, and
new plugin packages written. Built on the plugin contract (`mvit.registry`), which plugins import;
this stage they never need."""
