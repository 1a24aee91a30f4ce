"""YAML for config files: PyYAML's safe loader, less what it takes silently or chokes on.

A key given twice in one mapping (PyYAML keeps the last, so a user's first setting is silently ignored), nesting
deep enough to exhaust Python's recursion limit, and aliases that expand to millions of values or contain
themselves ("billion laughs") are refused with the line they start on.
"""
from __future__ import annotations

import yaml

MAX_YAML_DEPTH = 64  # a config nests 3 levels; the pure-Python composer recurses once per level
MAX_YAML_VALUES = 100_000  # a config holds a few hundred values; aliases can multiply them ("billion laughs")


class Refused(Exception):
    """YAML that parses but that the loader will not take; `line` is 1-based (None: unknown)."""

    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.line = line


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, less what it accepts silently or chokes on: a key given twice in one mapping (PyYAML
    keeps the last, so the first is silently ignored), and nesting deeper than MAX_YAML_DEPTH (the composer
    recurses once per level, so `[[[[...` ends in a RecursionError). Merge keys (`<<: *base`) may still be
    overridden, as YAML intends."""

    def __init__(self, stream):
        super().__init__(stream)
        self._where: list = []  # the index (key node or item number) of each node being composed

    def compose_node(self, parent, index):
        if len(self._where) >= MAX_YAML_DEPTH:
            raise Refused(f"nesting deeper than {MAX_YAML_DEPTH} levels (a config needs 3)", self.peek_event().start_mark.line + 1)
        self._where.append(index)
        try:
            return super().compose_node(parent, index)
        finally:
            self._where.pop()

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                raise Refused(f"key '{self._dotted(key.value)}' is given twice (line {first[key.tag, key.value]} "
                               f"and line {line}; YAML would silently keep the last): keep one", line)
            first[key.tag, key.value] = line
        return node

    def _dotted(self, leaf: str) -> str:
        parts = []
        for index in self._where:
            if isinstance(index, yaml.ScalarNode):
                parts.append(f".{index.value}")
            elif isinstance(index, int):
                parts.append(f"[{index}]")
        return ("".join(parts) + f".{leaf}").lstrip(".")


def _check_expansion(root: yaml.Node) -> None:
    """Refuse aliases that expand to more than MAX_YAML_VALUES values or MAX_YAML_DEPTH levels, or that contain
    themselves: PyYAML shares aliased objects, but everything that walks the loaded tree (validation, dumping the
    resolved config) sees each alias in full. Iterative, with the expanded size of each node computed once."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        kids = ([] if isinstance(node, yaml.ScalarNode) else
                [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else list(node.value))
        if children_done:
            values = 1 + sum(size[id(k)][0] for k in kids)
            depth = 1 + max((size[id(k)][1] for k in kids), default=0)
            open_nodes.discard(id(node))
            size[id(node)] = (values, depth)
            if values > MAX_YAML_VALUES:
                raise Refused(f"aliases (*name) expand to more than {MAX_YAML_VALUES} values: write the values out",
                               node.start_mark.line + 1)
            if depth > MAX_YAML_DEPTH:
                raise Refused(f"aliases (*name) nest deeper than {MAX_YAML_DEPTH} levels", node.start_mark.line + 1)
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:  # reached again while its own children are being expanded
            raise Refused("an alias refers to a node that contains it (a recursive structure)",
                           node.start_mark.line + 1)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids)


def load(text: str):
    """yaml.safe_load with the refusals of `StrictLoader` and `_check_expansion` (raises Refused)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
