"""The pipeline's own code, saved with it, so that plain diffusers loads a saved `SiTPipeline` without this package.

diffusers runs code that ships with a repository when a ``model_index.json`` entry names a module file instead of a
library (``["pipeline_sit", "SiTPipeline"]`` → ``pipeline_sit.py`` in the repository root,
``["transformer_sit", "SiTTransformer2DModel"]`` → ``transformer/transformer_sit.py``) and the caller passes
``trust_remote_code=True``. It copies only a file's direct relative imports, and from the Hub it downloads only the
named file of a weight folder, so every file written here is self-contained: the live module's source with the
package modules it imports relatively inlined ahead of it (`flat_module_source`). It is generated from the installed
library at save time and never drifts from it.

`SiTPipeline.from_pretrained` reads such a folder back as this package's classes (`library_model_index`) and never
runs the saved code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

PACKAGE = __name__.split(".")[0]
MODEL_INDEX_NAME = "model_index.json"
# Methods of the pipeline that connect it to this package (they import this module); the saved copy is plain diffusers.
LIBRARY_ONLY_METHODS = ("save_pretrained", "load_config")
# What diffusers' dynamic-module loader takes for a relative import (it would look for the file next to the module).
_RELATIVE_IMPORT_LINE = re.compile(r"^\s*(?:from\s+\.\S+\s+import|import\s+\.\S+)", flags=re.MULTILINE)
# Classes that a saved file names only in annotations (other components) stand for their diffusers base class.
_ANNOTATION_BASES: tuple[type, ...] = (ModelMixin, SchedulerMixin)


def _annotation_only_names(tree: ast.Module) -> set[str]:
    """Names that occur in `tree` only inside annotations (parameters, returns, annotated assignments)."""
    annotations: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every_arg = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            every_arg += [arg for arg in (arguments.vararg, arguments.kwarg) if arg is not None]
            annotations += [arg.annotation for arg in every_arg if arg.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    annotation_nodes = {id(node) for annotation in annotations for node in ast.walk(annotation)}
    in_annotations, in_code = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (in_annotations if id(node) in annotation_nodes else in_code).add(node.id)
    return in_annotations - in_code


def _annotation_base(module_name: str, name: str) -> type | None:
    """The diffusers base class standing in for component class `name` of `module_name`, if it is one."""
    value = getattr(importlib.import_module(module_name), name, None)
    return next((base for base in _ANNOTATION_BASES if isinstance(value, type) and issubclass(value, base)), None)


def _statement_lines(node: ast.stmt) -> range:
    """0-based line indices of a statement, decorators included."""
    first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    return range(first - 1, node.end_lineno)


def _top_level_definitions(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level other than by importing."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    return names


def _imports_package_absolutely(node: ast.stmt) -> bool:
    """Whether a statement imports this package by name, which a saved file could not follow."""
    if isinstance(node, ast.Import):
        return any(alias.name.partition(".")[0] == PACKAGE for alias in node.names)
    return isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.partition(".")[0] == PACKAGE


class _Flattener:
    """Concatenates a module and the package modules it imports relatively (dependencies first, each once)."""

    def __init__(self) -> None:
        self.sections: list[str] = []
        self.done: list[str] = []
        self.started: set[str] = set()
        self.definitions: dict[str, str] = {}

    def add(self, module_name: str, *, main: bool) -> None:
        if module_name in self.started:
            raise ValueError(f"{module_name} is part of an import cycle; it cannot be inlined.")
        self.started.add(module_name)
        module = importlib.import_module(module_name)
        source = Path(module.__file__).read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.splitlines()
        drop: set[int] = set()
        replacements: dict[int, str] = {}
        annotation_only = _annotation_only_names(tree)
        body = tree.body
        if not main and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            drop |= set(_statement_lines(body[0]))  # a dependency's docstring
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                drop |= set(_statement_lines(node))
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                replacements[node.lineno - 1] = self._import(node, module, annotation_only)
                drop |= set(_statement_lines(node))
            elif _imports_package_absolutely(node):
                raise ValueError(f"{module_name} imports {PACKAGE} absolutely; use a relative import.")
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in LIBRARY_ONLY_METHODS:
                        drop |= set(_statement_lines(item))
        for name in _top_level_definitions(tree):
            if name in self.definitions:
                raise ValueError(
                    f"{module_name} and {self.definitions[name]} both define {name!r}: they cannot be inlined into one "
                    "file; rename one of them."
                )
            self.definitions[name] = module_name
        kept = [
            replacements.get(index, line)
            for index, line in enumerate(lines)
            if index not in drop or index in replacements
        ]
        text = "\n".join(kept).strip("\n")
        self.sections.append(text if main else f"# ---- {module_name} ----\n\n{text}")
        self.done.append(module_name)

    def _import(self, node: ast.ImportFrom, module: ModuleType, annotation_only: set[str]) -> str:
        """What replaces a relative import: nothing (the module is inlined above) or stand-in base classes."""
        if node.module is None:
            raise ValueError(f"{module.__name__}: `from . import name` is not supported in saved code; import names.")
        target = importlib.util.resolve_name("." * node.level + node.module, module.__package__)
        names = [alias.asname or alias.name for alias in node.names]
        bases = [_annotation_base(target, alias.name) for alias in node.names]
        if all(name in annotation_only for name in names) and all(bases):
            return "\n".join(
                f"from {base.__module__} import {base.__name__} as {name}  # annotation only: loaded from its own file"
                for name, base in zip(names, bases, strict=True)
            )
        if target not in self.done:
            self.add(target, main=False)
        aliases = [f"{alias.asname} = {alias.name}" for alias in node.names if alias.asname not in (None, alias.name)]
        return "\n".join(aliases)


def flat_module_source(module_name: str) -> str:
    """Self-contained source of `module_name`: its own source with every module of this package that it imports
    relatively inlined ahead of it (once each, without their docstrings), and the classes it names only in annotations
    (other components) bound to their diffusers base class. Methods listed in `LIBRARY_ONLY_METHODS` are left out.

    Raises:
        ValueError: the modules cannot be joined into one file (a name defined twice, an unsupported import form).
    """
    flattener = _Flattener()
    flattener.add(module_name, main=True)
    *dependencies, main = flattener.sections
    main_tree = ast.parse(main)
    docstring_end = main_tree.body[0].end_lineno if ast.get_docstring(main_tree) is not None else 0
    main_lines = main.splitlines()
    version = getattr(sys.modules[PACKAGE], "__version__", "")
    header = (
        f"# Generated by {PACKAGE} {version} from {module_name} when the pipeline was saved, for plain diffusers:\n"
        "# DiffusionPipeline.from_pretrained(..., trust_remote_code=True). Edit the library, not this file.\n"
        f"# Inlined: {', '.join(flattener.done[:-1]) or 'nothing'}."
    )
    parts = [header, "\n".join(main_lines[:docstring_end]), "from __future__ import annotations", *dependencies]
    parts.append("# ---- " + module_name + " ----\n\n" + "\n".join(main_lines[docstring_end:]).strip("\n"))
    text = "\n\n".join(part for part in parts if part) + "\n"
    relative_import = _RELATIVE_IMPORT_LINE.search(text)
    if relative_import:
        raise ValueError(f"The saved code of {module_name} still has a relative import: {relative_import[0]!r}")
    return text


def _own_module(module_name: str | None) -> bool:
    """Whether a class's module (None for a missing component) is part of this package."""
    return module_name is not None and module_name.partition(".")[0] == PACKAGE


def write_hub_code(pipeline: Any, save_directory: str | os.PathLike) -> list[str]:
    """Write the code of `pipeline` and of its components that are this package's classes into a folder saved by
    diffusers' `save_pretrained`, and name those files in its ``model_index.json``; returns the files written.

    The pipeline's module goes to the folder's root, a component's into the component's folder, each named after its
    module (``pipeline_sit.py``, ``transformer/transformer_sit.py``, ``scheduler/scheduling_sit_sde.py``). Components
    are found by the modules that diffusers recorded for them (a compiled transformer's is its own class's).
    """
    save_directory = Path(save_directory)
    index_path = save_directory / MODEL_INDEX_NAME
    model_index = json.loads(index_path.read_text(encoding="utf-8"))
    modules = {"_class_name": (type(pipeline).__module__, type(pipeline).__name__)}
    modules |= {
        name: tuple(entry) for name, entry in model_index.items() if isinstance(entry, list) and len(entry) == 2
    }
    written = []
    for key, (module_name, class_name) in modules.items():
        if not _own_module(module_name):
            continue
        stem = module_name.rsplit(".", 1)[-1]
        relative = f"{stem}.py" if key == "_class_name" else f"{key}/{stem}.py"
        (save_directory / relative).write_text(flat_module_source(module_name), encoding="utf-8")
        written.append(relative)
        model_index[key] = [stem, class_name]
    index_path.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def library_model_index(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a loaded ``model_index.json``) with the entries that name code files saved by `write_hub_code`
    mapped back to this package's classes (``["transformer_sit", "SiTTransformer2DModel"]`` →
    ``["diffusers_repa.models.transformer_sit", "SiTTransformer2DModel"]``, ``_class_name`` → ``"SiTPipeline"``), so
    that loading uses the installed library and never runs the saved files. Other entries are returned unchanged."""
    package = importlib.import_module(PACKAGE)
    mapped = dict(config)
    for key, entry in config.items():
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
            continue
        stem, class_name = entry
        cls = getattr(package, class_name, None) if class_name in getattr(package, "__all__", ()) else None
        if not isinstance(cls, type) or cls.__module__.rsplit(".", 1)[-1] != stem:
            continue
        mapped[key] = class_name if key == "_class_name" else [cls.__module__, class_name]
    return mapped
